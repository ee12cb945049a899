"""numpy-only toy envs and agents shared by the tests (importable under spawn/forkserver)."""
from __future__ import annotations

import os
import time

import numpy as np

from sampling.spaces import Box, Dict, Discrete


class CountingEnv:
    """Deterministic: obs = [env_id, episode, t, last_action] (float32); reward = t + 1.

    Episode ``k`` of env ``i`` lasts ``lengths[(i + k) % len(lengths)]`` steps; it ends
    ``terminated`` when that length is even and ``truncated`` when odd. ``reset(seed=s)``
    sets env_id = s - base_seed (so the test can see which seed each env got).
    info = {"t": t, "score": float(reward)}.
    """

    def __init__(self, lengths=(3, 5, 4), base_seed=0, n_actions=3):
        self.lengths = tuple(lengths)
        self.base_seed = base_seed
        self.observation_space = Box(-np.inf, np.inf, shape=(4,), dtype=np.float32)
        self.action_space = Discrete(n_actions)
        self.env_id = -1
        self.episode = -1
        self.t = 0
        self.seeds = []

    def _obs(self, action=0):
        return np.array([self.env_id, self.episode, self.t, action], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        self.seeds.append(seed)
        if seed is not None:
            self.env_id = seed - self.base_seed
            self.episode = -1
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        length = self.lengths[(self.env_id + self.episode) % len(self.lengths)]
        done = self.t >= length
        terminated = done and length % 2 == 0
        truncated = done and length % 2 == 1
        reward = float(self.t)
        return self._obs(int(action)), reward, terminated, truncated, {"t": self.t,
                                                                       "score": reward}

    def close(self):
        pass


class DictObsEnv(CountingEnv):
    """CountingEnv with a dict observation:
    {"vec": float32[4], "img": uint8[2, 3], "n": {"k": int64[]}}."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.observation_space = Dict({
            "vec": Box(-np.inf, np.inf, shape=(4,), dtype=np.float32),
            "img": Box(0, 255, shape=(2, 3), dtype=np.uint8),
        })

    def _obs(self, action=0):
        v = super()._obs(action)
        img = np.full((2, 3), (self.t + 10 * max(self.env_id, 0)) % 256, dtype=np.uint8)
        return {"vec": v, "img": img, "n": {"k": np.int64(self.t)}}


class FailingEnv(CountingEnv):
    """Raises ``RuntimeError('boom ...')`` at ``where`` ("init", "reset", "step") in env ``env_id``
    ``fail_env`` (only when not in the process with pid ``safe_pid``, so the parent's probe
    env survives), after ``after`` steps for "step". ``how="exit"`` calls ``os._exit(3)``
    instead, ``how="kill"`` SIGKILLs itself."""

    def __init__(self, where="step", after=0, fail_env=1, safe_pid=None, how="raise", **kw):
        super().__init__(**kw)
        self.where, self.after, self.fail_env, self.how = where, after, fail_env, how
        self.safe_pid = safe_pid
        self.steps = 0
        if where == "init" and os.getpid() != safe_pid:
            self._fail()

    def _fail(self):
        if self.how == "exit":
            os._exit(3)
        if self.how == "kill":
            os.kill(os.getpid(), 9)
        raise RuntimeError(f"boom in {self.where}")

    def reset(self, *, seed=None, options=None):
        out = super().reset(seed=seed, options=options)
        if self.where == "reset" and self.env_id == self.fail_env and os.getpid() != self.safe_pid:
            self._fail()
        return out

    def step(self, action):
        self.steps += 1
        if (self.where == "step" and self.env_id == self.fail_env and self.steps > self.after
                and os.getpid() != self.safe_pid):
            self._fail()
        return super().step(action)


class SlowEnv(CountingEnv):
    """Sleeps ``delay`` seconds in every step (a slow env is not a dead one)."""

    def __init__(self, delay=0.05, **kw):
        super().__init__(**kw)
        self.delay = delay

    def step(self, action):
        time.sleep(self.delay)
        return super().step(action)


class ShapeChangingEnv(CountingEnv):
    """Env ``bad_env`` returns a wrong observation from step ``at`` on: ``change`` is
    "shape" (shape (5,)), "dtype" (float64), "broadcast" (shape (1,), which numpy would
    silently broadcast), "list" (a list of Python floats) or "none" (None)."""

    def __init__(self, bad_env=1, at=2, change="shape", **kw):
        super().__init__(**kw)
        self.bad_env, self.at, self.change = bad_env, at, change

    def _obs(self, action=0):
        o = super()._obs(action)
        if self.env_id == self.bad_env and self.t >= self.at:
            return {"shape": lambda: np.zeros(5, np.float32),
                    "dtype": lambda: o.astype(np.float64),
                    "broadcast": lambda: o[:1],
                    "list": o.tolist,
                    "none": lambda: None}[self.change]()
        return o


class CountingAgent:
    """Deterministic rlpyt-style agent over CountingEnv observations.

    action = (env_id + t + prev_action) % n_actions computed from the inputs only;
    agent_info = {"value": float32 obs[:, 2] * 0.5, "logp": float32 -obs[:, 0]};
    value(obs, ...) = obs[:, 2] + 100. Keeps a per-env "memory" (steps since reset_one)
    indexed by global env id, and records every call in ``calls`` (in this process only).
    """

    def __init__(self, n_actions=3, n_envs=64):
        self.n_actions = n_actions
        self.memory = np.zeros(n_envs, np.int64)
        self.calls = []
        self.mode = None

    def reset(self):
        self.memory[:] = 0
        self.calls.append(("reset",))

    def reset_one(self, idx):
        self.memory[idx] = 0
        self.calls.append(("reset_one", int(idx)))

    def sample_mode(self, itr):
        self.mode = ("sample", itr)

    def eval_mode(self, itr):
        self.mode = ("eval", itr)

    def step(self, observation, prev_action, prev_reward, env_ids=None):
        obs = observation["vec"] if isinstance(observation, dict) else observation
        if env_ids is not None:
            self.memory[env_ids] += 1
        a = (obs[:, 0].astype(np.int64) + obs[:, 2].astype(np.int64)
             + np.asarray(prev_action, np.int64)) % self.n_actions
        info = {"value": (obs[:, 2] * 0.5).astype(np.float32),
                "logp": (-obs[:, 0]).astype(np.float32)}
        return a, info

    def value(self, observation, prev_action, prev_reward):
        obs = observation["vec"] if isinstance(observation, dict) else observation
        return (obs[:, 2] + 100).astype(np.float32)


def counting_policy(observation):
    """Plain callable policy for CountingEnv: action = (env_id + t) % 3."""
    obs = observation["vec"] if isinstance(observation, dict) else observation
    return (obs[:, 0].astype(np.int64) + obs[:, 2].astype(np.int64)) % 3


def cartpole_policy(observation):
    """Deterministic CartPole controller (pole angle + angular velocity)."""
    return (observation[:, 2] + 0.5 * observation[:, 3] > 0).astype(np.int64)


def snapshot(batch) -> dict:
    """A deep copy of a batch (its arrays are views valid until the next batch)."""
    def copy(x):
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return tuple(copy(v) for v in x)
        return np.array(x, copy=True)
    out = {k: copy(v) for k, v in batch.items() if k != "traj_infos"}
    out["traj_infos"] = [t.stats() for t in batch.traj_infos]
    return out


def assert_batches_equal(a: dict, b: dict, path="batch") -> None:
    """Every field bit-identical (nested dicts included), same dtypes, same episode stats."""
    assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
    for k in a:
        if isinstance(a[k], tuple):
            assert isinstance(b[k], tuple) and len(a[k]) == len(b[k]), f"{path}.{k} differs"
            assert_batches_equal(dict(enumerate(a[k])), dict(enumerate(b[k])), f"{path}.{k}")
        elif isinstance(a[k], dict):
            assert_batches_equal(a[k], b[k], f"{path}.{k}")
        elif k == "traj_infos":
            assert a[k] == b[k], f"{path}.traj_infos differ:\n{a[k]}\n{b[k]}"
        else:
            assert a[k].dtype == b[k].dtype, f"{path}.{k}: dtype {a[k].dtype} != {b[k].dtype}"
            assert a[k].shape == b[k].shape, f"{path}.{k}: shape {a[k].shape} != {b[k].shape}"
            assert a[k].tobytes() == b[k].tobytes(), f"{path}.{k} differs"


def shm_entries():
    """Names in /dev/shm (shared-memory segments and named semaphores)."""
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


class HangingEnv(CountingEnv):
    """Env ``stuck_env`` (by its env id, ``seed - base_seed``; eval envs come after the
    batch_B training envs) stops returning at ``where``: "step" (after ``after`` steps),
    "reset" (its first reset) or "init" (in env_fn, the ``stuck_env``-th one a process makes).
    ``how``: "sleep" (a Python-level wait), "lock" (a C-level wait on a held lock) or
    "stop" (the process SIGSTOPs itself). Never in the process with pid ``safe_pid`` (the
    parent's probe env)."""

    def __init__(self, where="step", how="sleep", stuck_env=1, after=2, safe_pid=None, **kw):
        super().__init__(**kw)
        self.where, self.how, self.stuck_env, self.after = where, how, stuck_env, after
        self.safe_pid = safe_pid
        self.steps = 0
        if where == "init" and os.getpid() != safe_pid and _init_counter() == stuck_env:
            self._hang()

    def _hang(self):
        if self.how == "stop":
            import signal
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.how == "lock":
            import threading
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()  # never returns
        time.sleep(300)

    def reset(self, *, seed=None, options=None):
        out = super().reset(seed=seed, options=options)
        if self.where == "reset" and self.env_id == self.stuck_env and os.getpid() != self.safe_pid:
            self._hang()
        return out

    def step(self, action):
        self.steps += 1
        if (self.where == "step" and self.env_id == self.stuck_env and self.steps > self.after
                and os.getpid() != self.safe_pid):
            self._hang()
        return super().step(action)


_INIT_CALLS = [0]


def _init_counter() -> int:
    """How many HangingEnvs this process made before (env_fn's call index in a worker)."""
    _INIT_CALLS[0] += 1
    return _INIT_CALLS[0] - 1
