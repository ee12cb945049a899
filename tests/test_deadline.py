"""The step deadline (``step_timeout=``): a worker whose env never returns (a deadlocked
simulator, a SIGSTOPped process) makes the parent raise WorkerError within the deadline
plus about a second, naming the worker, the env and the phase, with the worker's Python
stack at that moment; the worker is killed and nothing leaks. Without a deadline a slow
env is never killed."""
from __future__ import annotations

import functools
import os
import time

import numpy as np
import pytest

import sampling
from sampling.pool import DEADLINE_POLL_S, POLL_S, STACK_WAIT_S
from sampling.worker import ENV_FN_TIMEOUT_FACTOR
from tests.helpers import (
    PARALLEL,
    CountingAgent,
    HangingEnv,
    SlowEnv,
    one_per,
    read_stamp,
    with_methods,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

DEADLINE_S = 0.5
# The README's promise: the parent raises "within the deadline plus about a second": it
# notices within a poll period (DEADLINE_POLL_S, or the per-step handoff's POLL_S) and
# waits up to STACK_WAIT_S for the stack, then kills the worker.
REPORT_S = max(DEADLINE_POLL_S, POLL_S) + STACK_WAIT_S
# ... checked with the slack a loaded 2-core machine needs (the other tests' processes
# compete for the CPUs; stopping and reaping processes is slow then).
LOADED_SLACK_S = 2.0


def _make(kind, start_method="fork", eval_env_fn=None, step_timeout=DEADLINE_S, stamp=None,
          **env_kw):
    env_fn = functools.partial(HangingEnv, safe_pid=os.getpid(), lengths=(50,), stamp=stamp,
                               **env_kw)
    return sampling.make_sampler(kind, env_fn, CountingAgent(), batch_T=8, batch_B=4,
                                 n_workers=2, start_method=start_method,
                                 step_timeout=step_timeout, eval_n_envs=2, eval_max_steps=40,
                                 eval_env_fn=eval_env_fn)


def _expect_stuck(fn, match, stamp, deadline=DEADLINE_S):
    """``fn()`` raises WorkerError matching ``match`` within ``deadline`` + REPORT_S (+ the
    slack) of the moment the env got stuck (the time HangingEnv wrote to ``stamp``)."""
    with pytest.raises(sampling.WorkerError, match=match) as info:
        fn()
    elapsed = time.monotonic() - read_stamp(stamp)
    assert elapsed < deadline + REPORT_S + LOADED_SLACK_S, f"reported after {elapsed:.2f} s"
    return info.value


# How the env stops returning: "sleep" (Python) and "stop" (SIGSTOP: the worker cannot
# answer) under METHODS, and "lock" (a C-level wait) under fork: the start method does not
# change how a stuck env looks.
STUCK = ([(k, how, m) for k, how, m in with_methods([(k, how) for k in PARALLEL
                                                      for how in ("sleep", "stop")])]
         + [(k, "lock", "fork") for k in PARALLEL])


@pytest.mark.parametrize("kind,how,start_method", STUCK)
def test_a_stuck_step_is_reported_with_the_workers_stack(kind, start_method, how, tmp_path):
    stamp = tmp_path / "stuck"
    s = _make(kind, start_method, where="step", how=how, stamp=str(stamp))
    err = _expect_stuck(s.obtain_samples,
                        r"worker 0 \(envs 0\.\.1; eval envs 4\.\.4\): env 1 did not return from "
                        r"its step at batch step 2 .*within step_timeout=0\.5 s; the worker "
                        r"was killed", stamp)
    assert err.worker == 0 and err.envs == [0, 1]
    if how == "stop":
        assert "did not respond" in str(err)
    else:
        tb = err.remote_traceback
        assert "helpers.py" in tb and "in _hang" in tb and "in step" in tb, tb
    with pytest.raises(sampling.SamplerClosedError):
        s.obtain_samples()


ENV_FN_DEADLINE_S = 0.2  # x ENV_FN_TIMEOUT_FACTOR (10): env_fn() gets 2 s


@pytest.mark.parametrize("kind", one_per("driver", kinds=PARALLEL))
@pytest.mark.parametrize("where,step_timeout,match", [
    ("init", ENV_FN_DEADLINE_S,
     r"env_fn\(\) for env [13] did not return within 2 s \(10 x step_timeout\)"),
    ("reset", DEADLINE_S, r"the first reset of env 1 did not return within step_timeout"),
])
def test_stuck_start_up_phases_are_reported(kind, where, step_timeout, match, tmp_path):
    deadline = step_timeout * (ENV_FN_TIMEOUT_FACTOR if where == "init" else 1)
    stamp = tmp_path / "stuck"
    _expect_stuck(lambda: _make(kind, where=where, step_timeout=step_timeout,
                                stamp=str(stamp)), match, stamp, deadline)


@pytest.mark.parametrize("kind", one_per("driver", kinds=PARALLEL))
def test_a_stuck_eval_env_is_reported(kind, tmp_path):
    stamp = tmp_path / "stuck"
    eval_env_fn = functools.partial(HangingEnv, safe_pid=os.getpid(), lengths=(50,),
                                    where="step", stuck_env=4 + 1, after=3,  # eval env 5
                                    stamp=str(stamp))
    with _make(kind, where="none", eval_env_fn=eval_env_fn) as s:
        s.obtain_samples()
        _expect_stuck(s.evaluate_agent, r"worker 1 \(envs 2\.\.3; eval envs 5\.\.5\): eval env 5 "
                                        r"did not "
                                        r"return from its step at evaluation step 3 within "
                                        r"step_timeout", stamp)


SLOW_STEP_S = 0.1  # each step of the slow env: well within ...
WITHIN_S = 1.0  # ... this step_timeout


@pytest.mark.parametrize("kind", PARALLEL)
def test_a_slow_env_within_the_deadline_runs(kind):
    env_fn = functools.partial(SlowEnv, delay=SLOW_STEP_S, lengths=(5,))
    with sampling.make_sampler(kind, env_fn, CountingAgent(), batch_T=3, batch_B=2,
                               n_workers=2, step_timeout=WITHIN_S) as s:
        for k, batch in enumerate(s.steps(2)):  # CountingEnv, episodes of 5 steps
            t = [[3 * k + i, 3 * k + i] for i in range(3)]  # obs t at each row
            t = [[x if x < 5 else x - 5 for x in row] for row in t]
            np.testing.assert_array_equal(batch.observation[..., 0], [[0, 1]] * 3)
            np.testing.assert_array_equal(batch.observation[..., 2], t)
            np.testing.assert_array_equal(batch.reward, np.array(t) + 1)
            np.testing.assert_array_equal(batch.done, np.array(t) == 4)


@pytest.mark.parametrize("value,error,match", [
    (0, ValueError, r"step_timeout must be a finite number of seconds > 0, got 0"),
    (-1.0, ValueError, "got -1.0"), (float("inf"), ValueError, "got inf"),
    (float("nan"), ValueError, "got nan"), (True, TypeError, "got True"),
    ("1", TypeError, "got '1'"),
])
def test_bad_step_timeout(value, error, match):
    with pytest.raises(error, match=match):
        sampling.make_sampler("cpu", HangingEnv, CountingAgent(), batch_T=2, batch_B=2,
                              step_timeout=value)


def test_serial_refuses_a_step_timeout():
    with pytest.raises(ValueError, match=r"step_timeout needs worker processes.*serial"):
        sampling.make_sampler("serial", HangingEnv, CountingAgent(), batch_T=2, batch_B=2,
                              step_timeout=1.0)
