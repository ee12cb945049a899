"""numpy-only toy envs and agents shared by the tests (importable under spawn/forkserver),
the test matrix (kinds, start methods, reset modes) derived from the package, and process
and /dev/shm bookkeeping."""
from __future__ import annotations

import faulthandler
import functools
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

import sampling
from sampling.api import RESET_MODES as _RESET_MODES
from sampling.spaces import Box, Dict, Discrete

# -- the test matrix: every kind is a row of sampling.KINDS, picked here by its properties --
KINDS = list(sampling.KINDS)
PARALLEL = [k for k, v in sampling.KINDS.items() if v.workers]  # envs step in worker processes
SERVED = [k for k, v in sampling.KINDS.items() if v.served]  # the parent acts for the workers
GROUPED = [k for k, v in sampling.KINDS.items() if v.groups > 1]  # worker groups take turns
# each worker steps its envs with its own copy of the agent
WORKER_AGENTS = [k for k, v in sampling.KINDS.items() if v.driver == "worker_agents"]
RESET_MODES = list(_RESET_MODES)

# -- start methods ---------------------------------------------------------------------------
# Every start method this platform has. Tests of what the start method changes (semaphore
# and segment names, pickling, start-up failures, the forkserver's environment, the resource
# tracker, restart descriptor passing, parameter mirroring under spawn, leaks under each
# method) run each of them always, and carry the start_method_matters marker.
ALL_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
# SAMPLING_TEST_METHODS (tox sets it): "all" (the default) runs every test under every
# start method; "fork" runs the tests whose behaviour does not depend on it (batch
# semantics, batch-phase faults, lag faults, env-close paths, deadlines) under fork, plus one
# smoke case of each such test under spawn (with_methods).
METHODS_SETTING = os.environ.get("SAMPLING_TEST_METHODS", "all")
if METHODS_SETTING not in ("all", "fork"):
    raise RuntimeError(f"SAMPLING_TEST_METHODS must be 'all' or 'fork', got "
                       f"{METHODS_SETTING!r}")
REDUCED = METHODS_SETTING == "fork" and "fork" in ALL_METHODS
METHODS = ["fork"] if REDUCED else list(ALL_METHODS)
SMOKE_METHOD = "spawn" if "spawn" in ALL_METHODS else ALL_METHODS[-1]
# For a test parametrized by the start method alone: METHODS, and the smoke case's method.
METHODS_AND_SMOKE = METHODS + ([SMOKE_METHOD] if REDUCED and SMOKE_METHOD not in METHODS
                               else [])


def with_methods(cases, key: str = "") -> list:
    """Each of ``cases`` (tuples, or single values) with a start method appended, for
    ``pytest.mark.parametrize``: every case under every method of METHODS, and, where
    METHODS is reduced to fork, one case also under SMOKE_METHOD (spawn). Which case is
    picked by the place of the call (file and line) and ``key`` (for calls in a loop), so
    that the smoke cases of a module spread over its cases, and a test gets the same one
    however the suite is invoked."""
    cases = [c if isinstance(c, tuple) else (c,) for c in cases]
    out = [c + (m,) for c in cases for m in METHODS]
    if REDUCED and SMOKE_METHOD not in METHODS:
        caller = sys._getframe(1)
        where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}:{key}"
        out.append(cases[zlib.crc32(where.encode()) % len(cases)] + (SMOKE_METHOD,))
    return out


def one_per(*fields: str, kinds=KINDS) -> list:
    """The first of ``kinds`` (in table order) for each distinct value of the named fields or
    properties of :class:`sampling.kinds.Kind`: ``one_per("driver")`` is one kind per driver,
    ``one_per("workers")`` one kind without worker processes and one with them."""
    seen, out = set(), []
    for k in kinds:
        key = tuple(getattr(sampling.KINDS[k], f) for f in fields)
        if key not in seen:
            seen.add(key)
            out.append(k)
    return out


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


class SlowEnv(CountingEnv):
    """Sleeps ``delay`` seconds in every step (a slow env is not a dead one)."""

    def __init__(self, delay=0.05, **kw):
        super().__init__(**kw)
        self.delay = delay

    def step(self, action):
        time.sleep(self.delay)
        return super().step(action)


# How long a gated StepLogEnv waits for its gate before it steps anyway (and the test that
# forgot to open it fails on the times): far longer than any test holds one closed.
GATE_BOUND_S = 60.0
GATE_POLL_S = 0.002


class StepLogEnv(CountingEnv):
    """Logs its steps to the file ``<log_dir>/log-<env_id>`` (one env per file, so any
    process may write it): a line "begin <n> <time>" when its n-th step (from 1, over its
    life) starts and "end <n> <time>" when it returns, with ``time.monotonic()``
    (system-wide on Linux, so comparable across processes). :func:`read_step_log` reads
    them.

    ``gate_every=T``: step n first waits (up to GATE_BOUND_S) until the test opens gate
    ``(n - 1) // T`` (:func:`open_gate`; with T steps per batch, the gate of batch k),
    logging "wait <n> <time>" if the gate is closed, and logs its beginning after that.
    ``delay``: seconds each step takes from step ``slow_from`` on. Nothing is logged or
    gated in the process with pid ``safe_pid`` (the parent's probe env)."""

    def __init__(self, log_dir, gate_every=None, delay=0.0, slow_from=1, safe_pid=None,
                 **kw):
        super().__init__(**kw)
        self.log_dir, self.gate_every, self.safe_pid = log_dir, gate_every, safe_pid
        self.delay, self.slow_from = delay, slow_from
        self.n_steps = 0

    def _log(self, what: str) -> None:
        with open(os.path.join(self.log_dir, f"log-{self.env_id}"), "a") as f:
            f.write(f"{what} {self.n_steps} {time.monotonic()!r}\n")

    def step(self, action):
        self.n_steps += 1
        if os.getpid() == self.safe_pid:
            return super().step(action)
        if self.gate_every:
            gate = os.path.join(self.log_dir, f"gate-{(self.n_steps - 1) // self.gate_every}")
            if not os.path.exists(gate):
                self._log("wait")
            deadline = time.monotonic() + GATE_BOUND_S
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(GATE_POLL_S)
        self._log("begin")
        if self.n_steps >= self.slow_from:
            time.sleep(self.delay)
        out = super().step(action)
        self._log("end")
        return out


def open_gate(log_dir, k: int) -> None:
    """Let gated :class:`StepLogEnv` steps of gate ``k`` go."""
    Path(log_dir, f"gate-{k}").touch()


def read_step_log(log_dir) -> dict:
    """``{(env_id, n, "wait" | "begin" | "end"): time}`` from :class:`StepLogEnv`'s files (their
    complete lines: one may be being written)."""
    out = {}
    for path in Path(log_dir).glob("log-*"):
        for line in path.read_text().split("\n")[:-1]:
            what, n, t = line.split()
            out[int(path.name[len("log-"):]), int(n), what] = float(t)
    return out


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


def assert_runs_equal(got: list, ref: list) -> None:
    """:func:`assert_batches_equal` for each pair of batches of two runs ("batch i")."""
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_batches_equal(g, r, f"batch {i}")


class IdTraj(sampling.TrajInfo):
    """TrajInfo that also records which env ran the episode (CountingEnv obs[0]), its
    episode number, its first and final obs t, and how many segments updated it."""

    def __init__(self, discount=0.99):
        super().__init__(discount)
        self.EnvId = -1
        self.Episode = -1
        self.StartT = -1
        self.FinalT = -1
        self.Segments = 0

    def update(self, segment):
        if self.Segments == 0:
            obs = segment.observation
            self.EnvId, self.Episode, self.StartT = int(obs[0, 0]), int(obs[0, 1]), int(obs[0, 2])
        self.Segments += 1
        super().update(segment)

    def terminate(self, final_observation):
        self.FinalT = int(final_observation[2])
        return self


class PolicyAgent:
    """A plain policy as an rlpyt-style agent whose agent_info copies observation columns:
    ``info={"theta": 2}`` records ``observation[:, 2]`` as agent_info["theta"]."""

    def __init__(self, policy, info: dict):
        self.policy, self.info = policy, info

    def step(self, observation, prev_action, prev_reward):
        return self.policy(observation), {k: observation[:, c].copy()
                                          for k, c in self.info.items()}


def gym_cartpole(**kw):
    """env_fn for gymnasium's CartPole-v1 (``kw`` for gymnasium.make); skips the test
    without gymnasium."""
    import pytest  # here: spawned workers import this module, and need no pytest

    gymnasium = pytest.importorskip("gymnasium")
    return functools.partial(gymnasium.make, "CartPole-v1", **kw)


def shm_entries():
    """Names in /dev/shm (shared-memory segments and named semaphores)."""
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def descendants(pid: int) -> list:
    """The live descendants of process ``pid`` (children, their children, ...), from /proc."""
    children: dict = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def shm_holders(names) -> dict:
    """``{name: {pid, ...}}``: the live processes that hold each of the /dev/shm ``names``
    open (a file descriptor) or mapped, by inode (/proc/<pid>/fd and /proc/<pid>/maps:
    glibc's sem_open maps a new semaphore under a temporary name, then links it)."""
    inodes: dict = {}
    for n in names:
        try:
            st = os.stat(f"/dev/shm/{n}")
        except OSError:
            continue
        inodes[st.st_dev, st.st_ino] = n
    out: dict = {n: set() for n in names}
    if not inodes:
        return out
    shm_inodes = {ino: n for (_, ino), n in inodes.items()}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                try:
                    st = os.stat(f"/proc/{d}/fd/{fd}")
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in inodes:
                    out[inodes[st.st_dev, st.st_ino]].add(pid)
            with open(f"/proc/{d}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if (len(fields) == 6 and fields[5].startswith("/dev/shm/")
                            and int(fields[4]) in shm_inodes):
                        out[shm_inodes[int(fields[4])]].add(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return out


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid is someone else's now
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_all(pids) -> None:
    """SIGKILL whichever of ``pids`` is still alive (a test's clean-up of orphans)."""
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# -- envs that fail or hang on purpose ------------------------------------------------------
class EnvFault(RuntimeError):
    """Raised by :class:`FaultEnv`."""


def write_stamp(stamp) -> None:
    """Write ``time.monotonic()`` (system-wide on Linux, so comparable across processes) to
    the file ``stamp``, if one is given: a test measures from it to the parent's raise."""
    if stamp is not None:
        with open(stamp, "w") as f:
            f.write(repr(time.monotonic()))


def read_stamp(stamp) -> float:
    with open(stamp) as f:
        return float(f.read())


def in_worker(w: int) -> bool:
    """True in the process of sampler worker ``w`` (named "sampling-<kind>-worker-<w>")."""
    name = mp.current_process().name
    return name.startswith("sampling-") and name.endswith(f"-worker-{w}")


HANGS = ("sleep", "lock", "stop")  # FaultEnv's ways of never returning


class FaultEnv(CountingEnv):
    """CountingEnv that fails (or hangs) once, at ``where``:

    - ``"init"``: in the constructor, only in the process of worker ``worker``;
    - ``"reset"``: in any reset of the env with global index ``fail_env``;
    - ``"step"``: in the step after ``after`` steps of env ``fail_env`` (decorrelation
      steps count too);
    - anything else (``"none"``): never.

    ``how``: ``"raise"`` (``exc(message)``, by default an :class:`EnvFault`), ``"exit"``
    (``os._exit(3)``), ``"kill"`` (SIGKILL to itself) or ``"bus"`` (SIGBUS, as a page of a
    full /dev/shm gives); or it never returns: ``"sleep"`` (a Python-level wait), ``"lock"``
    (a C-level wait on a held lock) or ``"stop"`` (the process SIGSTOPs itself). Every fault
    first writes the time to the ``stamp`` file when one is given (:func:`write_stamp`).
    Never fails in the process with pid ``safe_pid`` (the parent's probe env).
    """

    def __init__(self, where="step", after=0, fail_env=3, worker=1, how="raise", stamp=None,
                 safe_pid=None, exc=EnvFault, **kw):
        super().__init__(**kw)
        self.where, self.after, self.fail_env, self.how = where, after, fail_env, how
        self.exc = exc
        self.stamp, self.safe_pid = stamp, safe_pid
        self.n_steps = 0
        if where == "init" and self._init_armed(worker):
            self._inject_fault()

    def _init_armed(self, worker: int) -> bool:
        return in_worker(worker) and os.getpid() != self.safe_pid

    def _armed(self) -> bool:
        return self.env_id == self.fail_env and os.getpid() != self.safe_pid

    def _inject_fault(self):
        write_stamp(self.stamp)
        if self.how in HANGS:
            self._hang()
        if self.how == "exit":
            os._exit(3)
        if self.how in ("kill", "bus"):
            faulthandler.disable()  # pytest's, inherited by fork: no dump of a SIGBUS on purpose
            os.kill(os.getpid(), signal.SIGKILL if self.how == "kill" else signal.SIGBUS)
            time.sleep(10)  # the signal is on its way
        raise self.exc(f"boom in {self.where} of env {self.env_id}")

    def _hang(self):
        if self.how == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.how == "lock":
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()  # never returns
        time.sleep(300)

    def reset(self, *, seed=None, options=None):
        out = super().reset(seed=seed, options=options)
        if self.where == "reset" and self._armed():
            self._inject_fault()
        return out

    def step(self, action):
        self.n_steps += 1
        if self.where == "step" and self.n_steps > self.after and self._armed():
            self._inject_fault()
        return super().step(action)


class FailingEnv(FaultEnv):
    """A FaultEnv that raises a plain ``RuntimeError('boom ...')`` in env 1 (the CLI tests
    name it: ``--env tests.helpers:FailingEnv``)."""

    def __init__(self, where="step", after=0, fail_env=1, exc=RuntimeError, **kw):
        super().__init__(where=where, after=after, fail_env=fail_env, exc=exc, **kw)


class HangingEnv(FaultEnv):
    """A FaultEnv that stops returning (``how``: "sleep", "lock" or "stop") in env
    ``stuck_env`` (by its env id, ``seed - base_seed``; eval envs come after the batch_B
    training envs): at ``where`` "step" (after ``after`` steps) or "reset" (its first
    reset), or at "init" in env_fn's ``stuck_env``-th call in each process (not only in one
    worker). Never in the process with pid ``safe_pid`` (the parent's probe env)."""

    def __init__(self, where="step", how="sleep", stuck_env=1, after=2, safe_pid=None, **kw):
        super().__init__(where=where, how=how, fail_env=stuck_env, after=after,
                         safe_pid=safe_pid, **kw)

    def _init_armed(self, worker: int) -> bool:
        return os.getpid() != self.safe_pid and _init_counter() == self.fail_env


_INIT_CALLS = [0]


def _init_counter() -> int:
    """How many HangingEnvs this process made before (env_fn's call index in a worker)."""
    _INIT_CALLS[0] += 1
    return _INIT_CALLS[0] - 1


def _stack(items: list):
    if isinstance(items[0], dict):
        return {k: _stack([x[k] for x in items]) for k in items[0]}
    return np.stack([np.asarray(x) for x in items])


class Vectorized:
    """A vector env made of ``env_fns``' single envs, as gymnasium's SyncVectorEnv makes one
    (duck-typed: it works for any single env, sampling's spaces included).

    ``autoreset_mode`` "SameStep" (as gymnasium: the final observations in
    ``infos["final_obs"]``, the ended envs' step infos in ``infos["final_info"]`` and their
    reset infos at the top level) or "Disabled" (``reset(options={"reset_mask": m})``), or
    any other value to test refusals. Infos: each entry of the single infos as an ``[n]``
    array, with its ``_name`` mask, as gymnasium reports them.
    """

    def __init__(self, env_fns, autoreset_mode="SameStep"):
        self.envs = [fn() for fn in env_fns]
        self.num_envs = len(self.envs)
        self.metadata = {"autoreset_mode": autoreset_mode}
        self.single_observation_space = getattr(self.envs[0], "observation_space", None)
        self.single_action_space = self.envs[0].action_space
        self.action_space = self.single_action_space
        self.closed = False

    def reset(self, *, seed=None, options=None):
        n = self.num_envs
        mask = (options or {}).get("reset_mask", np.ones(n, bool))
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else seed or [None] * n
        obs = [env.reset(seed=s)[0] if m else None
               for env, s, m in zip(self.envs, seeds, mask)]
        self._last = [o if o is not None else last
                      for o, last in zip(obs, getattr(self, "_last", obs))]
        return _stack(self._last), {}

    def step(self, actions):
        n, same_step = self.num_envs, self.metadata["autoreset_mode"] == "SameStep"
        out, infos, finals, final_infos = [], [], [None] * n, [{}] * n
        ended = np.zeros(n, bool)
        for i, (env, a) in enumerate(zip(self.envs, actions)):
            o, r, te, tr, info = env.step(a.item() if np.ndim(a) == 0 else a)
            if (te or tr) and same_step:  # as gymnasium: the reset's info at the top level,
                finals[i], final_infos[i], ended[i] = o, info, True  # the step's in final_info
                o, info = env.reset()
            out.append((o, r, te, tr))
            infos.append(info)
        self._last = [x[0] for x in out]
        info = _vector_info(infos)
        if ended.any():
            info["final_obs"] = np.empty(n, object)
            for i in np.flatnonzero(ended):
                info["final_obs"][i] = finals[i]
            info["_final_obs"] = ended
            info["final_info"] = _vector_info(final_infos)
            info["_final_info"] = ended
        return (_stack(self._last), np.array([x[1] for x in out]),
                np.array([x[2] for x in out]), np.array([x[3] for x in out]), info)

    def close(self):
        self.closed = True
        for env in self.envs:
            env.close()


def _vector_info(infos: list) -> dict:
    """Per-env info dicts in gymnasium's vector form: each key an ``[n]`` array (zeros where
    an env did not report it) with its ``_key`` mask."""
    n, out = len(infos), {}
    for i, info in enumerate(infos):
        for k, v in info.items():
            if k not in out:
                out[k] = np.zeros(n, np.asarray(v).dtype)
                out["_" + k] = np.zeros(n, bool)
            out[k][i] = v
            out["_" + k][i] = True
    return out


def vectorized(env_fn, n, autoreset_mode="SameStep"):
    """A picklable factory of :class:`Vectorized` over ``n`` copies of ``env_fn()``."""
    return functools.partial(_make_vectorized, env_fn, n, autoreset_mode)


def _make_vectorized(env_fn, n, autoreset_mode):
    return Vectorized([env_fn] * n, autoreset_mode)


ROOT = Path(__file__).resolve().parent.parent


class RecurrentCounter:
    """Counts the steps of each env's episode in its "recurrent state", reset by reset_one:
    at every step the count must equal CountingEnv's obs[2] (the step in the episode)."""

    def __init__(self):
        self.count = np.zeros(64, np.int64)

    def reset(self):  # before the first batch (the sampler's probe called step once)
        self.count[:] = 0

    def reset_one(self, env_id):
        self.count[env_id] = 0

    def step(self, observation, prev_action, prev_reward, env_ids):
        c = self.count[env_ids].copy()
        self.count[env_ids] += 1
        return np.zeros(len(observation), np.int64), {"count": c}


# Generous for a benchmark command run with short timings on a loaded 2-core machine.
MODULE_TIMEOUT_S = 180


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, as a user runs the benchmark's
    commands: its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=MODULE_TIMEOUT_S, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
