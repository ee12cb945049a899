"""What a library owes the program that hosts it, and what a close read of the code found:
no global state pinned, warnings at the caller's line, errors that say where (in every
kind, once), no value coerced, deterministic failures not spent as restarts, and a stopped
worker reported within its deadline."""
from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import sampling
from sampling import WorkerError, auto
from sampling.spaces import Box
from tests.fault_helpers import worker_pid
from tests.helpers import CountingAgent, CountingEnv, EnvFault, FaultEnv, Vectorized

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_TIMEOUT_S = 120
STEP_TIMEOUT_S = 1.0
# A stopped worker is reported within its deadline plus the parent's polling and the wait
# for a stack it cannot give, plus this much for a loaded 2-core machine.
LOADED_MACHINE_SLACK_S = 2.0
REPORT_BOUND_S = (STEP_TIMEOUT_S + sampling.pool.DEADLINE_POLL_S + sampling.pool.STACK_WAIT_S
                  + LOADED_MACHINE_SLACK_S)


def _make(kind, env_fn=CountingEnv, agent=None, **kw):
    kw = dict(dict(batch_T=4, batch_B=2), **kw)
    if kind != "serial":
        kw.setdefault("n_workers", 2)
        kw.setdefault("start_method", "fork")
    return sampling.make_sampler(kind, env_fn, agent or CountingAgent(), **kw)


def _run(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=SCRIPT_TIMEOUT_S)


# -- the host program's global state ------------------------------------------------------
@pytest.mark.parametrize("kind", ["cpu", "auto"])
def test_the_host_program_can_still_choose_its_start_method(kind):
    """make_sampler without start_method must not pin multiprocessing's global context: the
    program may call set_start_method afterwards (a library never chooses it)."""
    proc = _run(f"""
import multiprocessing as mp, sampling
if __name__ == "__main__":
    agent = sampling.RandomAgent(sampling.CartPole().action_space)
    with sampling.make_sampler({kind!r}, sampling.CartPole, agent, batch_T=4, batch_B=2,
                               n_workers=2) as s:
        s.obtain_samples()
    mp.set_start_method("spawn")
    print(mp.get_start_method())
""")
    assert proc.returncode == 0 and proc.stdout.strip() == "spawn", proc.stderr


class ArrayAgent:
    """A cpu-kind agent holding a float array outside any torch module (its copies would
    keep it frozen: make_sampler warns)."""

    def __init__(self):
        self.w = np.zeros(3, np.float32)

    def __call__(self, observation):
        return np.zeros(len(observation), np.int64)


def test_warnings_point_at_the_callers_line():
    with pytest.warns(UserWarning) as caught:
        _make("cpu", agent=ArrayAgent())
        _make("cpu", batch_B=2, n_workers=3)
    record = [w for w in caught if w.category is UserWarning]  # not 3.12's fork warnings
    messages = [str(w.message) for w in record]
    assert any("holds float arrays outside any torch module" in m for m in messages), messages
    assert any("n_workers=3 > batch_B=2" in m for m in messages), messages
    assert {w.filename for w in record} == {__file__}, [(w.filename, w.lineno) for w in record]


# -- errors that say where, once ----------------------------------------------------------
class ObsOnlyReset(CountingEnv):
    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed)[0]


@pytest.mark.parametrize("kind", ["serial", "cpu", "auto"])
def test_auto_probes_the_env_as_every_kind_does(kind):
    with pytest.raises(TypeError, match=r"env\.reset\(\) returned a ndarray; the gymnasium API "
                                        r"returns \(observation, info\)"):
        _make(kind, env_fn=ObsOnlyReset, batch_B=4)


def _text(e: BaseException) -> str:
    """What Python prints for an exception (its notes included)."""
    return "".join(traceback.format_exception_only(type(e), e))


def test_an_env_error_in_the_serial_kind_says_where():
    env_fn = functools.partial(FaultEnv, where="step", after=2, fail_env=1)
    with _make("serial", env_fn=env_fn) as s:
        with pytest.raises(EnvFault) as info:
            s.obtain_samples()
    assert "boom in step of env 1" in str(info.value)
    assert _text(info.value).count("(in env 1, step 2 of the batch)") == 1, _text(info.value)


@pytest.mark.parametrize("kind", ["serial", "cpu"])
def test_the_sampler_s_own_checks_name_the_env_and_step_once(kind):
    """A bad observation: the message names the env and the step itself; the location is not
    added a second time."""
    from tests.helpers import ShapeChangingEnv
    env_fn = functools.partial(ShapeChangingEnv, change="shape")
    with _make(kind, env_fn=env_fn, batch_T=8) as s:
        with pytest.raises((ValueError, WorkerError)) as info:
            s.obtain_samples()
    text = _text(info.value)
    assert text.count("step 1 of the batch") == 1 and "(in env" not in text, text


@pytest.mark.parametrize("kind", ["serial", "cpu"])
def test_a_failing_eval_reset_names_the_eval_env_by_its_env_id(kind):
    """Eval env e is global env batch_B + e everywhere: in env_ids and in messages; the
    header of a worker's error names its eval envs; the reset before an evaluation is
    tagged."""
    # eval envs are 2 and 3 (after batch_B=2 training envs); env 3 fails in its second reset
    env_fn = functools.partial(_FailsOnSecondReset, fail_env=3)
    with _make(kind, env_fn=env_fn, eval_n_envs=2, eval_max_steps=2) as s:  # no episode ends
        s.evaluate_agent()
        with pytest.raises((EnvFault, WorkerError)) as info:
            s.evaluate_agent()
    text = _text(info.value)
    assert "in the reset of eval env 3 before an evaluation" in text, text
    if kind == "cpu":
        assert "worker 1 (envs 1..1; eval envs 3..3) raised EnvFault" in text, text


class _FailsOnSecondReset(CountingEnv):
    def __init__(self, fail_env, **kw):
        super().__init__(**kw)
        self.fail_env, self.resets = fail_env, 0

    def reset(self, *, seed=None, options=None):
        out = super().reset(seed=seed, options=options)
        self.resets += 1
        if self.env_id == self.fail_env and self.resets == 2:
            raise EnvFault(f"boom in reset of env {self.env_id}")
        return out


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


def test_a_worker_error_that_cannot_cross_the_pipe_keeps_its_tags():
    """The stand-in for an exception that does not unpickle keeps where it happened and the
    batch row it names (a restart cuts the batch there), and its type's name once."""
    from multiprocessing import Pipe

    from sampling.pool import _report
    e = Unpicklable("boom", "here")
    e.sampling_where, e.sampling_step = "env 3, step 5 of the batch", 5
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(e))
    a, b = Pipe()
    try:
        _report(a, e)
        sent = b.recv()
    finally:
        a.close()
        b.close()
    assert (str(sent.error), sent.error.sampling_type) == ("boom here", "Unpicklable")
    assert (sent.error.sampling_where, sent.error.sampling_step) == (e.sampling_where, 5)


# -- nothing coerced ------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [
    ("discount", True), ("bootstrap_value", 1), ("final_observation", "yes"),
    ("bootstrap_value", None)])
def test_flags_and_numbers_take_no_bools_for_each_other(option, value):
    with pytest.raises((TypeError, ValueError), match=option):
        _make("serial", **{option: value})


class HugeActionAgent:
    def __call__(self, observation):
        return np.full((len(observation), 1), 1e300)  # float64, beyond float32


class BoxActionEnv(CountingEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.action_space = Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def step(self, action):
        return super().step(0)


@pytest.mark.parametrize("kind", ["serial", "cpu", "gpu"])
def test_an_action_beyond_float32_is_refused_not_stored_as_inf(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises((TypeError, WorkerError), match=r"magnitude 1e\+300, beyond the "
                                                           r"range of float32"):
            _make(kind, env_fn=BoxActionEnv, agent=HugeActionAgent()).obtain_samples()


class HugeRewardEnv(CountingEnv):
    def step(self, action):
        o, r, te, tr, info = super().step(action)
        return o, 1e40, te, tr, info


@pytest.mark.parametrize("env_fn", [HugeRewardEnv, functools.partial(Vectorized, [
    HugeRewardEnv, HugeRewardEnv])], ids=["single", "vector"])
def test_a_reward_beyond_float32_is_refused_without_numpy_s_warning_first(env_fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _make("serial", env_fn=env_fn) as s:
            with pytest.raises(ValueError, match="stored as inf in float32"):
                s.obtain_samples()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught


# -- what the probe calls -------------------------------------------------------------------
class NoValueHead(CountingAgent):
    def value(self, observation, prev_action, prev_reward):
        raise TypeError("the model returns no value")


def test_bootstrap_value_calls_the_agent_s_value_at_construction():
    """A configuration bug shows when the sampler is made, not at the end of batch 0 (nor,
    with max_restarts, as crashes that restart workers)."""
    with pytest.raises(TypeError, match="the model returns no value"):
        _make("cpu", agent=NoValueHead(), bootstrap_value=True, max_restarts=10)


class ListOfDictsInfo(CountingAgent):
    def step(self, observation, prev_action, prev_reward):
        action, _ = super().step(observation, prev_action, prev_reward)
        return action, {"meta": [{"k": 1}] * len(action)}


def test_agent_info_holding_lists_of_dicts_is_refused_saying_so():
    with pytest.raises(TypeError, match=r"agent_info holds a list of dict.*lists of dicts and "
                                        r"other objects are not supported"):
        _make("serial", agent=ListOfDictsInfo())


def test_a_sequence_observation_space_is_refused_at_construction():
    gymnasium = pytest.importorskip("gymnasium")

    class SequenceEnv(CountingEnv):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.observation_space = gymnasium.spaces.Sequence(
                gymnasium.spaces.Box(-1, 1, (2,), np.float32))

        def _obs(self, action=0):
            return (np.zeros(2, np.float32),) * 2  # the same length every step, here

    with pytest.raises(TypeError, match=r"observation_space is a Sequence space, whose "
                                        r"observations vary in size"):
        _make("serial", env_fn=SequenceEnv)


# -- auto -------------------------------------------------------------------------------
def test_auto_s_headline_is_the_deciding_reason():
    """cpu ruled out (an agent that cannot reach spawned workers): the reason says so first,
    not that the agent is expensive."""
    m = auto.Measurements(env_step_s=300e-6, agent_call_s={n: 0.5e-6 for n in (1, 2, 4)},
                          batch_B=4, n_workers=2, alternating_workers=2, usable_cpus=2,
                          ruled_out={"cpu": auto.RULED_OUT_UNPICKLABLE})
    predicted = auto.predict(m)
    kind = auto.pick(predicted)
    reason = auto.explain(kind, m, predicted, 1.0)
    assert sampling.KINDS[kind].served, (kind, reason)
    assert reason.startswith(f"cpu is ruled out ({auto.RULED_OUT_UNPICKLABLE})"), reason


def test_the_agent_s_device_is_found_inside_a_policy_function(monkeypatch):
    """A policy function closing over a CUDA module is on the GPU (auto must not fork it
    into cpu workers). Checked with stand-ins for torch's classes, so it runs without torch
    and without a GPU (tests/test_cuda.py checks the real thing where CUDA exists)."""
    from sampling.agent_state import device_of

    class Module:
        def __init__(self, cuda):
            self.weight = Tensor(cuda)

        def state_dict(self, keep_vars=False):
            return {"weight": self.weight}

    class Tensor:
        def __init__(self, cuda):
            self.device = types.SimpleNamespace(type="cuda" if cuda else "cpu")

    fake = types.SimpleNamespace(nn=types.SimpleNamespace(Module=Module), Tensor=Tensor,
                                 Generator=type("Generator", (), {}))
    monkeypatch.setitem(sys.modules, "torch", fake)

    def make_policy(model):
        def policy(observation):
            return model
        return policy

    assert device_of(make_policy(Module(cuda=True))) == "cuda"
    assert device_of(make_policy(Module(cuda=False))) is None
    assert device_of(types.SimpleNamespace(net=types.SimpleNamespace(body=Module(True)))) \
        == "cuda"


# -- restarts and deadlines ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_a_worker_stopped_between_batches_is_reported_within_its_deadline(kind, no_leaks):
    """SIGSTOP while idle: the parent hands it the next command, which it never takes up;
    the handed phase has the step deadline, so the next batch raises instead of hanging."""
    with _make(kind, step_timeout=STEP_TIMEOUT_S) as s:
        s.obtain_samples()
        os.kill(worker_pid(kind, 1), signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker 1 .*did not take up what this process "
                                              r"handed it .*within step_timeout=1 s"):
            s.obtain_samples()
        assert time.monotonic() - t0 < REPORT_BOUND_S


class Versioned:
    """An agent whose parameters are named after the copy (a copy is built differently from
    the original: its names differ)."""

    def __init__(self):
        self.name = f"w{id(self)}"
        self.w = np.zeros(2, np.float32)

    def shared_arrays(self):
        return {self.name: self.w}

    def __deepcopy__(self, memo):
        return Versioned()

    def __call__(self, observation):
        return np.zeros(len(observation), np.int64)


def test_the_action_server_s_copy_must_have_the_original_s_parameters():
    with pytest.raises(RuntimeError, match=r"the action server's copy of the agent "
                                           r"\(policy_lag=1\) has parameters"):
        _make("gpu", agent=Versioned(), policy_lag=1)


# -- the benchmark ------------------------------------------------------------------------
def _bench(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "sampling", "-T", "4", "-B", "2",
                           "--seconds", "0.2", "-q", *args], env=env, capture_output=True,
                          text=True, timeout=SCRIPT_TIMEOUT_S)


def test_the_benchmark_says_when_the_env_fails_alone_and_exits_1():
    proc = _bench("--env", "tests.helpers:FailingEnv", "--env-kwargs",
                  '{"fail_env": 0, "after": 5}', "--kinds", "serial")
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "the env raised RuntimeError: boom in step of env 0 while stepping alone" \
        in proc.stderr, proc.stderr


def test_the_benchmark_exits_1_when_no_kind_could_run():
    proc = _bench("--kinds", "alternating", "-B", "1")
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "no kind could run" in proc.stdout + proc.stderr


# -- sizing a network before the sampler exists -----------------------------------------
def test_env_spaces_gives_the_spaces_of_one_env_and_closes_it():
    from tests.helpers import vectorized
    closed = []

    class Closing(CountingEnv):
        def close(self):
            closed.append(True)

    obs_space, act_space = sampling.env_spaces(Closing)
    assert obs_space.shape == (4,) and act_space.n == 3 and closed == [True]
    obs_space, act_space = sampling.env_spaces(vectorized(CountingEnv, 2))
    assert obs_space.shape == (4,) and act_space.n == 3  # a vector env's single spaces
    with pytest.raises(TypeError, match="env_fn must be a zero-argument callable"):
        sampling.env_spaces(CountingEnv())


class SlowToUnpickle:
    """A cpu-kind agent whose copy takes longer to unpickle (in a spawned worker, before any
    sampling code runs) than the step deadline."""

    def __init__(self):
        self.n_actions = 3  # a state to unpickle (an empty one skips __setstate__)

    def __call__(self, observation):
        return np.zeros(len(observation), np.int64)

    def __setstate__(self, state):
        time.sleep(SLOW_START_S)
        self.__dict__.update(state)


SLOW_START_S = 0.6  # longer than step_timeout below: a start is not a step


class FailsOnce(CountingEnv):
    """Env 3 raises at its 5th step, in its first life only (seeded 3; a replacement's env
    is reseeded)."""

    def step(self, action):
        if self.env_id == 3 and self.t == 4:
            raise EnvFault("once")
        return super().step(action)


def test_a_replacement_starting_slowly_is_not_taken_for_a_stuck_step():
    """The replacement's beat starts idle: its start-up (unpickling, imports) has no step
    deadline, whatever its predecessor was doing when it failed."""
    with _make("cpu", env_fn=FailsOnce, agent=SlowToUnpickle(), batch_B=4, batch_T=8,
               start_method="spawn", step_timeout=0.2, max_restarts=1) as s:
        batches = list(s.steps(3))
    assert [len(b.restarts) for b in batches] == [1, 0, 0]
