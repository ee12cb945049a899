"""The step deadline (``step_timeout=``): a worker whose env never returns (a deadlocked
simulator, a SIGSTOPped process) makes the parent raise WorkerError within the deadline
plus about a second, naming the worker, the env and the phase, with the worker's Python
stack at that moment; the worker is killed and nothing leaks. Without a deadline a slow
env is never killed."""
from __future__ import annotations

import functools
import os
import time

import pytest

import sampling
from sampling.pool import DEADLINE_POLL_S, POLL_S, STACK_WAIT_S
from sampling.worker import ENV_FN_TIMEOUT_FACTOR
from tests.helpers import METHODS, PARALLEL, CountingAgent, HangingEnv, SlowEnv, one_per

pytestmark = pytest.mark.usefixtures("no_leaks")

DEADLINE_S = 0.5
# The parent notices within a poll period (DEADLINE_POLL_S, or the per-step handoff's
# POLL_S), waits up to STACK_WAIT_S for the stack, and kills the worker: about a second in
# all, and half a second more for the kill on a loaded machine.
REPORT_BOUND_S = DEADLINE_S + max(DEADLINE_POLL_S, POLL_S) + STACK_WAIT_S + 0.5


def _make(kind, start_method="fork", eval_env_fn=None, step_timeout=DEADLINE_S, **env_kw):
    env_fn = functools.partial(HangingEnv, safe_pid=os.getpid(), lengths=(50,), **env_kw)
    return sampling.make_sampler(kind, env_fn, CountingAgent(), batch_T=8, batch_B=4,
                                 n_workers=2, start_method=start_method,
                                 step_timeout=step_timeout, eval_n_envs=2, eval_max_steps=40,
                                 eval_env_fn=eval_env_fn)


def _expect_stuck(fn, match, deadline=DEADLINE_S):
    t0 = time.monotonic()
    with pytest.raises(sampling.WorkerError, match=match) as info:
        fn()
    assert time.monotonic() - t0 < deadline + REPORT_BOUND_S
    return info.value


@pytest.mark.parametrize("how", ["sleep", "lock", "stop"])
@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", PARALLEL)
def test_a_stuck_step_is_reported_with_the_workers_stack(kind, start_method, how):
    if how == "lock" and start_method != "fork":
        pytest.skip("one C-level wait is enough; the start method does not change it")
    s = _make(kind, start_method, where="step", how=how)
    t0 = time.monotonic()
    err = _expect_stuck(s.obtain_samples,
                        r"worker 0 \(envs 0\.\.1; eval envs 4\.\.4\): env 1 did not return from "
                        r"its step at "
                        r"batch step 2 .*within step_timeout=0\.5 s; the worker was killed")
    assert time.monotonic() - t0 < REPORT_BOUND_S
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
def test_stuck_start_up_phases_are_reported(kind, where, step_timeout, match):
    deadline = step_timeout * (ENV_FN_TIMEOUT_FACTOR if where == "init" else 1)
    _expect_stuck(lambda: _make(kind, where=where, step_timeout=step_timeout), match,
                  deadline)


@pytest.mark.parametrize("kind", one_per("driver", kinds=PARALLEL))
def test_a_stuck_eval_env_is_reported(kind):
    eval_env_fn = functools.partial(HangingEnv, safe_pid=os.getpid(), lengths=(50,),
                                    where="step", stuck_env=4 + 1, after=3)  # eval env 5
    with _make(kind, where="none", eval_env_fn=eval_env_fn) as s:
        s.obtain_samples()
        _expect_stuck(s.evaluate_agent, r"worker 1 \(envs 2\.\.3; eval envs 5\.\.5\): eval env 5 "
                                        r"did not "
                                        r"return from its step at evaluation step 3 within "
                                        r"step_timeout")


@pytest.mark.parametrize("kind", PARALLEL)
def test_a_slow_env_within_the_deadline_runs(kind):
    env_fn = functools.partial(SlowEnv, delay=0.1, lengths=(5,))
    with sampling.make_sampler(kind, env_fn, CountingAgent(), batch_T=3, batch_B=2,
                               n_workers=2, step_timeout=1.0) as s:
        assert s.obtain_samples().reward.shape == (3, 2)


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
