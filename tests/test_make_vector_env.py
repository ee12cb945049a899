"""``sampling.make_vector_env``: the worker pool behind gymnasium's VectorEnv API, identical
to ``gymnasium.vector.SyncVectorEnv`` for the same env_fns, seeds and actions, with the
samplers' guarantees (errors with tracebacks, deadlines, restarts, no leaks)."""
from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import pytest

import sampling
from sampling import SamplerClosedError, WorkerError
from sampling.spaces import Box, Dict, Discrete
from tests.fault_helpers import worker_pid
from tests.helpers import ALL_METHODS, CountingEnv, EnvFault, FaultEnv, HangingEnv, SlowEnv

gym = pytest.importorskip("gymnasium")
AutoresetMode = gym.vector.AutoresetMode
MODES = {"next_step": AutoresetMode.NEXT_STEP, "same_step": AutoresetMode.SAME_STEP}
N_ENVS, N_WORKERS = 4, 2
STEPS = 300  # enough for every env to end many episodes (InfoEnv's last 3 to 7 steps)
STEP_TIMEOUT_S = 1.0
LOADED_MACHINE_SLACK_S = 2.0  # a loaded 2-core machine: the deadline's report may lag this


class InfoEnv(gym.Env):
    """A gymnasium env with a dict observation and infos of every kind gymnasium batches:
    ints, floats, bools, strings, arrays, nested dicts, and keys that come and go. Episodes
    last 3 + (env_id + episode) % 5 steps; odd ones end truncated."""

    metadata: dict = {}

    def __init__(self, env_id=0):
        self.env_id = env_id
        self.observation_space = gym.spaces.Dict({
            "pos": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32),
            "count": gym.spaces.Discrete(100)})
        self.action_space = gym.spaces.Discrete(3)
        self.episode, self.t = -1, 0

    def _obs(self, action):
        return {"pos": np.array([self.t, action + self.np_random.random()], np.float32),
                "count": np.int64(self.t)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        info = {"reset_info": self.env_id, "opt": str(options)} if options else {"start": True}
        return self._obs(0), info

    def step(self, action):
        self.t += 1
        length = 3 + (self.env_id + self.episode) % 5
        end = self.t >= length
        info = {"t": self.t, "half": self.t / 2, "odd": bool(self.t % 2), "name": f"e{self.t}",
                "vec": np.full(2, self.t, np.int32), "nested": {"x": float(action)}}
        if self.t % 3 == 0:
            info["sometimes"] = self.t
        return self._obs(action), float(action) - 0.5, end and length % 2 == 0, \
            end and length % 2 == 1, info


def info_env(i):
    return functools.partial(InfoEnv, i)


def _assert_same(a, b, where):
    """Equal values, dtypes and structure (dicts, tuples, object arrays of observations)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray) and a.dtype == object:
        assert isinstance(b, np.ndarray) and b.dtype == object and a.shape == b.shape, where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b, err_msg=where)


def _side_by_side(env_fns, mode, start_method="fork", steps=STEPS, n_actions=3, seed=5):
    ref = gym.vector.SyncVectorEnv(env_fns, autoreset_mode=MODES[mode])
    with sampling.make_vector_env(env_fns, n_workers=N_WORKERS, autoreset_mode=mode,
                                  start_method=start_method) as envs:
        assert envs.metadata["autoreset_mode"] == MODES[mode]
        _assert_same(ref.reset(seed=seed), envs.reset(seed=seed), "reset")
        rng = np.random.default_rng(0)
        for t in range(steps):
            a = rng.integers(0, n_actions, len(env_fns))
            _assert_same(ref.step(a), envs.step(a), f"step {t}")
        seeds = [7, None, 9, 11][:len(env_fns)]
        _assert_same(ref.reset(seed=seeds, options={"level": 2}),
                     envs.reset(seed=seeds, options={"level": 2}), "reset with options")
        for t in range(20):
            a = rng.integers(0, n_actions, len(env_fns))
            _assert_same(ref.step(a), envs.step(a), f"step {t} after the second reset")
    ref.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_identical_to_sync_vector_env_with_dict_observations_and_every_kind_of_info(mode):
    _side_by_side([info_env(i) for i in range(N_ENVS)], mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_identical_to_sync_vector_env_on_cartpole(mode):
    _side_by_side([lambda: gym.make("CartPole-v1")] * N_ENVS, mode, steps=600, n_actions=2)


@pytest.mark.start_method_matters  # the program and its configs cross by pickling
@pytest.mark.parametrize("start_method", [m for m in ALL_METHODS if m != "fork"])
def test_identical_under_spawn_and_forkserver(start_method):
    _side_by_side([info_env(i) for i in range(N_ENVS)], "next_step", start_method, steps=50)


def test_tuple_observations_and_copy_semantics():
    class TupleEnv(CountingEnv):
        metadata, render_mode = {}, None

        def __init__(self, **kw):
            super().__init__(**kw)
            self.observation_space = gym.spaces.Tuple(
                (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(5)))
            self.action_space = gym.spaces.Discrete(3)

        def _obs(self, action=0):
            return (super()._obs(action), np.int64(self.t))

    env_fns = [TupleEnv] * N_ENVS
    ref = gym.vector.SyncVectorEnv(env_fns)
    with sampling.make_vector_env(env_fns, n_workers=2) as envs, \
            sampling.make_vector_env(env_fns, n_workers=2, copy=False) as views:
        _assert_same(ref.reset(seed=1), envs.reset(seed=1), "reset")
        views.reset(seed=1)
        first = envs.step(np.zeros(N_ENVS, np.int64))[0]
        view = views.step(np.zeros(N_ENVS, np.int64))[0]
        kept = (first[0].copy(), first[1].copy())
        envs.step(np.ones(N_ENVS, np.int64))
        views.step(np.ones(N_ENVS, np.int64))
        views.step(np.ones(N_ENVS, np.int64))
        _assert_same(first, kept, "copy=True returns copies")
        assert not np.array_equal(view[0], kept[0]), "copy=False returns views, overwritten"
    ref.close()


# -- gymnasium's ecosystem on it -------------------------------------------------------------
def test_gymnasium_vector_wrappers_accept_it():
    from gymnasium.wrappers.vector import (
        ClipAction,
        NormalizeObservation,
        RecordEpisodeStatistics,
    )

    envs = sampling.make_vector_env([lambda: gym.make("CartPole-v1")] * N_ENVS, n_workers=2)
    assert isinstance(envs, gym.vector.VectorEnv)
    stats = RecordEpisodeStatistics(NormalizeObservation(envs))
    stats.reset(seed=0)
    episodes = 0
    for _ in range(200):
        *_, infos = stats.step(stats.action_space.sample())
        episodes += int(infos.get("_episode", np.zeros(1, bool)).sum())
    assert episodes > 5 and len(stats.return_queue) == min(episodes, 100)
    stats.close()
    assert envs.closed

    def pendulum():
        return gym.make("Pendulum-v1")
    with sampling.make_vector_env([pendulum] * 2, n_workers=2) as raw:
        clipped = ClipAction(raw)
        clipped.reset(seed=0)
        clipped.step(np.full((2, 1), 10.0, np.float32))  # clipped to [-2, 2] before us


# -- errors, deadlines, restarts, closing ----------------------------------------------------
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_worker_exception_reaches_step_with_its_traceback(start_method, no_leaks):
    env_fns = [functools.partial(FaultEnv, where="step", after=5, fail_env=3)] * N_ENVS
    envs = sampling.make_vector_env(env_fns, n_workers=2, start_method=start_method)
    envs.reset(seed=0)  # CountingEnv's env_id is seed - base: env 3 has id 3
    with pytest.raises(WorkerError, match=r"vector env: worker 1 \(envs 2\.\.3\) raised "
                                          r"EnvFault: boom in step of env 3") as info:
        for _ in range(10):
            envs.step(np.zeros(N_ENVS, np.int64))
    assert "_inject_fault" in info.value.remote_traceback
    with pytest.raises(SamplerClosedError, match="the vector env is closed"):
        envs.step(np.zeros(N_ENVS, np.int64))
    del envs, info


class RewardEnv(CountingEnv):
    """Returns ``reward`` at its 2nd step (1.0 otherwise)."""

    def __init__(self, reward=1.0, **kw):
        super().__init__(**kw)
        self.reward = reward

    def step(self, action):
        o, _, te, tr, info = super().step(action)
        return o, self.reward if self.t == 2 else 1.0, te, tr, info


@pytest.mark.parametrize("reward, stored", [(3, 3.0), (np.float32(0.5), 0.5),
                                            (2 ** 63 + 1, float(2 ** 63 + 1)), (1e300, 1e300)])
def test_rewards_of_every_real_type_come_back_as_float64(reward, stored):
    with sampling.make_vector_env([functools.partial(RewardEnv, reward)] * 2,
                                  n_workers=2) as envs:
        envs.reset(seed=0)
        envs.step(np.zeros(2, np.int64))
        _, r, *_ = envs.step(np.zeros(2, np.int64))
        assert r.tolist() == [stored, stored]


def test_a_reward_beyond_float64_is_an_overflow_error_naming_the_env(no_leaks):
    """As SyncVectorEnv raises it (Python's OverflowError), with the env and step named."""
    with sampling.make_vector_env([RewardEnv, functools.partial(RewardEnv, 10 ** 400)],
                                  n_workers=2) as envs:
        envs.reset(seed=0)
        envs.step(np.zeros(2, np.int64))
        with pytest.raises(WorkerError, match=r"worker 1 \(envs 1\.\.1\) raised OverflowError: "
                                              r"int too large to convert to float.*env 1"):
            envs.step(np.zeros(2, np.int64))


def test_a_killed_worker_is_reported(no_leaks):
    with sampling.make_vector_env([CountingEnv] * N_ENVS, n_workers=2) as envs:
        envs.reset(seed=0)
        os.kill(worker_pid("vector-env", 0), signal.SIGKILL)
        with pytest.raises(WorkerError, match="worker 0 .*killed by signal SIGKILL"):
            envs.step(np.zeros(N_ENVS, np.int64))


def test_a_stuck_env_is_reported_within_its_deadline_with_its_stack(no_leaks):
    env_fns = [functools.partial(HangingEnv, stuck_env=2, after=3, safe_pid=os.getpid())]
    with sampling.make_vector_env(env_fns * N_ENVS, n_workers=2,
                                  step_timeout=STEP_TIMEOUT_S) as envs:
        envs.reset(seed=0)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker 1 \(envs 2\.\.3\): env 2 did not return "
                                              r"from its step .*within step_timeout=1 s") as e:
            for _ in range(10):
                envs.step(np.zeros(N_ENVS, np.int64))
        assert time.monotonic() - t0 < STEP_TIMEOUT_S * 4 + LOADED_MACHINE_SLACK_S
        assert "in _hang" in e.value.remote_traceback


@pytest.mark.parametrize("actions, error, match", [
    (np.zeros(3, np.int64), ValueError, r"shape \(3,\), expected \(4,\)"),
    (np.zeros(4, np.float64), TypeError, "float64, which cannot be stored as int64"),
    (np.array([0, 1, 3, 0]), ValueError, r"env 2's action 3 is outside its action space"),
    (np.array([0, -1, 0, 0]), ValueError, r"env 1's action -1 is outside"),
])
def test_bad_actions_are_refused_before_any_worker_steps(actions, error, match):
    with sampling.make_vector_env([CountingEnv] * N_ENVS, n_workers=2) as envs:
        envs.reset(seed=0)
        with pytest.raises(error, match=match):
            envs.step(actions)
        obs = envs.step(np.zeros(N_ENVS, np.int64))[0]
        assert (obs[:, 2] == 1).all(), "the refused step stepped no env"


@pytest.mark.parametrize("mode", list(MODES))
def test_max_restarts_replaces_a_failed_worker_by_the_documented_rule(mode):
    """Env 3 raises at its 6th step: that step returns its episode (and its worker's other
    env's) truncated at the last observation with reward 0; the new episodes start from a
    reset seeded env_seed(seed, env, 1), at once (SAME_STEP) or at the next step."""
    env_fns = [functools.partial(FaultEnv, where="step", after=5, fail_env=3,
                                 lengths=(50,))] * N_ENVS
    zeros = np.zeros(N_ENVS, np.int64)
    with sampling.make_vector_env(env_fns, n_workers=2, autoreset_mode=mode,
                                  max_restarts=1) as envs:
        envs.reset(seed=0)  # env i is seeded i: CountingEnv takes i as its id
        for _ in range(5):
            last = envs.step(zeros)[0]
        obs, reward, term, trunc, infos = envs.step(zeros)
        assert trunc.tolist() == [False, False, True, True] and not term.any()
        assert reward[2:].tolist() == [0.0, 0.0]
        seeds = [sampling.env_seed(0, b, 1) for b in (2, 3)]
        fresh = np.array([[s, 0, 0, 0] for s in seeds], np.float32)
        if mode == "same_step":
            np.testing.assert_array_equal(obs[2:], fresh)
            assert infos["_final_obs"].tolist() == [False, False, True, True]
            np.testing.assert_array_equal(np.stack(infos["final_obs"][2:]), last[2:])
        else:
            np.testing.assert_array_equal(obs[2:], last[2:])
            obs, reward, *_ = envs.step(zeros)
            np.testing.assert_array_equal(obs[2:], fresh)
            assert reward[2:].tolist() == [0.0, 0.0]
        assert [f.worker for f in envs.restarts] == [1]
        assert isinstance(envs.restarts[0].error, WorkerError)


@pytest.mark.parametrize("how", ["close", "gc", "exception", "ctrl_c"])
def test_nothing_is_left_on_any_way_out(how, no_leaks):
    # Ctrl-C must land while a step is in flight (the case that closes the vector env): its
    # envs take 50 ms a step, against microseconds between two rounds, where an interrupt
    # leaves a vector env that is still whole (and this test flaky, with CountingEnv's).
    env = functools.partial(SlowEnv, delay=0.05) if how == "ctrl_c" else CountingEnv
    envs = sampling.make_vector_env([env] * N_ENVS, n_workers=2, start_method="spawn")
    envs.reset(seed=0)
    if how == "close":
        envs.close()
        envs.close()  # idempotent
    elif how == "gc":
        del envs
    elif how == "exception":
        with pytest.raises(TypeError):
            envs.reset(seed="zero")
        envs.close()
    else:
        from tests.fault_helpers import interrupt_after
        old = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited
        try:                                                            # as ignored
            with pytest.raises(KeyboardInterrupt):
                with interrupt_after(0.2):
                    while True:
                        envs.step(np.zeros(N_ENVS, np.int64))
        finally:
            signal.signal(signal.SIGINT, old)
        with pytest.raises(SamplerClosedError):
            envs.step(np.zeros(N_ENVS, np.int64))


@pytest.mark.parametrize("kw, error, match", [
    (dict(env_fns=CountingEnv), TypeError, "env_fns must be a non-empty list"),
    (dict(env_fns=[]), TypeError, "env_fns must be a non-empty list"),
    (dict(env_fns=[CountingEnv, 3]), TypeError, "env_fns must be a non-empty list"),
    (dict(autoreset_mode="disabled"), ValueError, "autoreset_mode must be 'next_step' or"),
    (dict(copy=1), TypeError, "copy must be a bool"),
    (dict(n_workers=0), ValueError, "n_workers must be >= 1"),
    (dict(step_timeout=-1), ValueError, "step_timeout must be a finite number"),
    (dict(max_restarts=True), TypeError, "max_restarts must be an int"),
    (dict(start_method="thread"), ValueError, "start_method must be one of"),
])
def test_bad_arguments_are_refused_before_any_process_starts(kw, error, match):
    kw = dict(dict(env_fns=[CountingEnv] * 2), **kw)
    with pytest.raises(error, match=match):
        sampling.make_vector_env(kw.pop("env_fns"), **kw)


def test_reset_seeds_and_the_disabled_mode_are_checked():
    with sampling.make_vector_env([CountingEnv] * 2, n_workers=2) as envs:
        with pytest.raises(TypeError, match=r"reset\(seed=...\) takes None, an int"):
            envs.reset(seed=[1])
        with pytest.raises(ValueError, match="DISABLED autoreset"):
            envs.reset(options={"reset_mask": np.ones(2, bool)})


def test_without_gymnasium_spaces_it_still_steps():
    """sampling's own spaces (no gymnasium in the env): batched spaces are None."""
    class Plain(CountingEnv):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.observation_space = Dict({"x": Box(-1, 1, (2,), np.float32)})
            self.action_space = Discrete(2)

        def _obs(self, action=0):
            return {"x": np.full(2, self.t, np.float32)}

    with sampling.make_vector_env([Plain] * 2, n_workers=1) as envs:
        assert envs.n_workers == 1 and envs.observation_space is None
        obs, _ = envs.reset(seed=0)
        obs, reward, *_ = envs.step(np.zeros(2, np.int64))
        assert obs["x"].tolist() == [[1, 1], [1, 1]] and reward.dtype == np.float64


def test_env_fault_class_is_the_one_raised():
    assert issubclass(EnvFault, RuntimeError)
