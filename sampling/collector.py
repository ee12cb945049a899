"""Episode stats, and the collector that steps a slice of envs into its columns of a batch.

Imports numpy and :mod:`sampling.buffers`, :mod:`sampling.errors`, :mod:`sampling.spaces`,
:mod:`sampling.tree` (nothing above it: pool, worker and vector import it). The collector
is the same object in the serial sampler and in every worker process: kinds differ in who
calls the agent between two :meth:`Collector.step_envs` calls, never in how envs step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from .buffers import cast_problem
from .errors import describe, env_name, missing_entry, not_a_dict, tag, tagged
from .spaces import random_action_fn
from .tree import get, is_tree, path_text, stack, tree_leaves, tree_map

__all__ = ["TrajInfo", "Segment", "Collector", "make_env", "Numbering", "env_seed", "mark"]


# Where a worker is, for the step deadline and for where a failure cuts the batch: a worker
# that has a beat writes its progress as int64 words [sequence, phase, step, env index
# within the worker] (the parent reads them; the env index is written before every env
# call, the rest per step). HANDED is written by the parent (see pool.Pool.hand).
PHASES = ("idle", "env_fn", "reset", "decorrelation", "agent", "step", "eval step",
          "batch reset", "eval_env_fn", "eval reset", "waiting for actions", "handed")
(IDLE, MAKE, RESET, DECORRELATE, AGENT, STEP, EVAL, BATCH_RESET, EVAL_MAKE,
 EVAL_RESET, WAIT, HANDED) = range(len(PHASES))
BEAT_SEQ, BEAT_PHASE, BEAT_STEP, BEAT_ENV = range(4)  # the words of a beat


@dataclass(frozen=True)
class Numbering:
    """Global env indices of one rank's sampler, as if the envs of all ``world_size`` ranks
    were one sampler's: training envs first (rank r's are ``r * batch_B`` on), then the eval
    envs of every rank in turn. One rank (the default) numbers from 0."""

    rank: int
    world_size: int
    batch_B: int
    eval_n: int

    @property
    def first(self) -> int:
        """The global index of this rank's first training env."""
        return self.rank * self.batch_B

    @property
    def eval_first(self) -> int:
        """The global index of this rank's first eval env (its ``env_ids``, its seed)."""
        return self.world_size * self.batch_B + self.rank * self.eval_n

    def env_ids(self) -> np.ndarray:
        return np.arange(self.first, self.first + self.batch_B)

    def eval_ids(self) -> np.ndarray:
        return np.arange(self.eval_first, self.eval_first + self.eval_n)


def env_seed(seed: int, b: int, restart: int = 0) -> int:
    """The seed of global env ``b``'s first reset: ``seed + b``; once its worker was
    restarted ``restart`` times, the first 32-bit word of
    ``numpy.random.SeedSequence([seed, b, restart])`` (fresh, and the same for the same
    failures)."""
    if not restart:
        return seed + b
    return int(np.random.SeedSequence([seed, b, restart]).generate_state(1)[0])


def stream_key(seed: int, b: int, tag: int, restart: int = 0) -> list:
    """The entropy of a generator derived from global env ``b`` (decorrelation's, a
    worker's): ``[seed, b, tag]``, and the restart count once there was one."""
    return [seed, b, tag] + ([restart] if restart else [])


def mark(beat: Any, phase: int, t: int = 0, j: int = -1) -> None:
    """Record that this worker enters ``phase`` at step ``t`` on env ``j`` (no-op without
    a beat). The sequence word last: the parent reads a beat as moved when it changes."""
    if beat is not None:
        beat[BEAT_ENV] = j
        beat[BEAT_STEP] = t
        beat[BEAT_PHASE] = phase
        beat[BEAT_SEQ] += 1


# env_info values of these Python types go into a leaf of this dtype as they are: exactly
# (a Python int beyond int64 makes numpy raise OverflowError, never wrap).
_DIRECT = {"<f8": (float, int), "<f4": (float, int), "<i8": (int,), "|b1": (bool,)}


# -- the gymnasium API, checked where the sampler first meets an env --------------------
def make_env(env_fn: Callable[[], Any], label: str, fn_name: str = "env_fn") -> Any:
    """``env_fn()``, checked to look like a gymnasium env; errors name ``label``."""
    try:
        env = tagged(env_fn, f"{fn_name}() for {label}")
    except AssertionError as e:
        if "daemonic processes are not allowed to have children" not in str(e):
            raise
        raise RuntimeError(
            f"{fn_name}() for {label} starts processes of its own (e.g. gymnasium's "
            f"AsyncVectorEnv), which a worker cannot: the parallel kinds' workers are "
            f"daemonic processes, and those cannot have children. Use the 'serial' kind (the "
            f"env already steps in parallel), or a vector env that steps in this process "
            f"(vectorization_mode='sync')") from e
    if hasattr(env, "single_action_space"):  # a vector env (see sampling.vector)
        needed, what = VECTOR_API, ("a gymnasium-API vector env (num_envs, reset, step, "
                                    "single_observation_space, single_action_space)")
    else:
        needed, what = ("reset", "step", "action_space"), (
            "a gymnasium-API env (reset, step, observation_space, action_space), e.g. "
            "return gymnasium.make(...)")
    missing = [m for m in needed if not hasattr(env, m)]
    if missing:
        raise TypeError(f"{fn_name}() returned {type(env).__name__} for {label}, which has no "
                        f"{', '.join(missing)}; it must return {what}")
    return env


# What the sampler uses of a vector env (it needs no batched action_space).
VECTOR_API = ("reset", "step", "num_envs", "single_action_space")


def check_reset(out: Any, what: str) -> Any:
    """The observation of ``env.reset()``'s ``(observation, info)``; a clear error otherwise."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise TypeError(f"{what}: env.reset() returned {describe(out, arrays=False)}; the "
                        f"gymnasium API returns (observation, info) with info a dict (old gym "
                        f"returned the observation alone: return (obs, {{}}))")
    return out[0]


def check_step(out: Any, what: str) -> tuple:
    """``env.step()``'s 5-tuple, checked once (the probe); a clear error otherwise."""
    if not (isinstance(out, tuple) and len(out) == 5):
        raise TypeError(f"{what}: env.step() returned {describe(out, arrays=False)}; the "
                        f"gymnasium API returns (observation, reward, terminated, truncated, "
                        f"info) (old gym returned 4 values with one done flag)")
    check_reward(out[1], what, "the probe step")
    check_flag(out[2], "terminated", what, "the probe step")
    check_flag(out[3], "truncated", what, "the probe step")
    return out


# Types whose values are real numbers a reward may be; others are checked one by one. Bool
# is an int to Python but never a reward: it is what an env returns when its outputs are
# out of order.
REWARD_TYPES = {float, int, np.float64, np.float32, np.float16, np.int64, np.int32,
                 np.int16, np.int8, np.uint8, np.uint16, np.uint32, np.uint64}


def check_reward(r: Any, what: str, when: str) -> float:
    """``r`` as a float if it is a real number (a 0-d numeric array too); else an error."""
    if r.__class__ in REWARD_TYPES:
        return r
    if isinstance(r, np.ndarray) and r.shape == () and r.dtype.kind in "iuf":
        return r.item()
    raise TypeError(f"{what} returned reward {r!r} ({type(r).__name__}) at {when}; a "
                    f"reward must be a real number (int or float, numpy scalars included), "
                    f"stored as float32: return float(reward)")


def check_flag(x: Any, name: str, what: str, when: str) -> bool:
    """``x`` as a bool if it is one (numpy bools too); else an error."""
    if x is True or x is False:
        return x
    if isinstance(x, np.bool_) or (isinstance(x, np.ndarray) and x.shape == ()
                                   and x.dtype == bool):
        return bool(x)
    raise TypeError(f"{what} returned {name}={x!r} ({type(x).__name__}) at {when}; "
                    f"terminated and truncated must be bools: return bool({name})")


class Segment:
    """Consecutive steps ``t0 .. t1-1`` of one env, as views into the batch.

    Attributes (``[t1 - t0, ...]`` arrays, dicts where the batch has dicts):
    ``observation``, ``action``, ``reward``, ``terminated``, ``truncated``,
    ``agent_info``, ``env_info``. Views are built on first access.
    """

    __slots__ = ("_src", "_idx")

    def __init__(self, source: dict, t0: int, t1: int):
        self._src = source  # one env's fields, each a [time, ...] array (or a tree of them)
        self._idx = slice(t0, t1)

    def __len__(self) -> int:
        return self._idx.stop - self._idx.start

    def _get(self, name: str) -> Any:
        arr = self._src[name]
        if arr.__class__ is np.ndarray:
            return arr[self._idx]
        return tree_map(lambda a: a[self._idx], arr)

    # Properties for the usual fields: found without the failed lookup that precedes
    # __getattr__, which would cost more than the slice itself.
    observation = property(lambda self: self._get("observation"))
    action = property(lambda self: self._get("action"))
    reward = property(lambda self: self._get("reward"))
    terminated = property(lambda self: self._get("terminated"))
    truncated = property(lambda self: self._get("truncated"))
    agent_info = property(lambda self: self._get("agent_info"))
    env_info = property(lambda self: self._get("env_info"))

    def __getattr__(self, name: str) -> Any:  # any other field of the batch
        if name.startswith("_"):  # e.g. copy's probes before the slots are set
            raise AttributeError(name)
        try:
            return self._get(name)
        except KeyError:
            raise AttributeError(name) from None


class TrajInfo:
    """Stats of one episode: ``Length``, ``Return``, ``DiscountedReturn``, ``NonzeroRewards``.

    To record more, subclass and extend :meth:`update` (called with each
    :class:`Segment` of the episode, in order) and/or :meth:`terminate` (called once
    with the episode's final observation); pass the subclass as ``traj_info=``.
    Public attributes (not starting with ``_``) are the stats.
    """

    def __init__(self, discount: float = 0.99):
        self.Length = 0
        self.Return = 0.0
        self.DiscountedReturn = 0.0
        self.NonzeroRewards = 0
        self._discount = float(discount)
        self._cur_discount = 1.0

    def update(self, segment: Segment) -> None:
        self.add_rewards(segment.reward.tolist())

    def add_rewards(self, r: list) -> None:
        """Add one segment's rewards (Python floats, in order) to the stats. The collector
        calls this directly, once per segment at the end of a batch, for a class that keeps
        TrajInfo's ``update`` and ``terminate`` (see :attr:`Collector.deferred`)."""
        # Python floats: an episode's segment is short, and numpy's per-call cost would
        # make these stats the most expensive thing the sampler does per episode.
        n = len(r)
        self.Length += n
        self.Return += sum(r)
        self.NonzeroRewards += n - r.count(0.0)
        g, acc = self._discount, 0.0
        for x in reversed(r):  # Horner: r0 + g * (r1 + g * (r2 + ...))
            acc = acc * g + x
        self.DiscountedReturn += self._cur_discount * acc
        self._cur_discount *= g ** n

    def terminate(self, final_observation: Any) -> TrajInfo:
        return self

    def stats(self) -> dict:
        """The public attributes as a dict."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.stats().items())})"


# TrajInfo's own hooks as defined here: one patched onto the class later (a mock, a logging
# wrapper) is not these, so its calls are kept.
_UPDATE, _TERMINATE = TrajInfo.update, TrajInfo.terminate


def _keeps_trajinfo_hooks(traj: Any) -> bool:
    """Whether ``traj``'s update and terminate are TrajInfo's own (not overridden by its
    class, patched onto TrajInfo, or set on the instance): then its stats can be added at
    the end of the batch."""
    cls = type(traj)
    return (getattr(cls, "update", None) is _UPDATE and getattr(cls, "terminate", None)
            is _TERMINATE and not {"update", "terminate"} & set(getattr(traj, "__dict__", ())))


class Row(NamedTuple):
    """A collector's views of one step t of its columns: what the agent wrote, what the
    step writes, and row t+1 of the carried fields."""

    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    done: np.ndarray
    next_prev_action: np.ndarray
    next_prev_reward: np.ndarray


@dataclass
class Views:
    """A collector's views of one set of batch buffers, made once so that the per-step loop
    allocates none (the collector switches sets with :meth:`Collector.use`)."""

    bufs: dict        # the set's full-size arrays
    cols: dict        # this slice's columns, by field, as [time, column, ...] views
    rows: list        # per step t, its Row
    # Per row, per column, a memoryview of that column's observation (1-D array
    # observations): assigning an array to it copies without a numpy call and raises unless
    # shape and dtype (buffer format) match exactly, so the check costs nothing on the
    # usual path. None per row where observations are trees or have no buffer format.
    obs_rows: list
    rewards: list     # per step, a memoryview of its reward row (stores a float32 per env)
    env_cols: list    # per column, its fields as [time, ...] views (what a Segment slices)
    # Per env_info leaf: (path, array, the Python types stored as they are); others go
    # through cast_problem, so a float where the probe saw an int is refused, not truncated.
    info_leaves: list
    blocks: list = None  # vector envs: per step, per vector env, its Block (sampling.vector)


class Collector:
    """Owns the envs of columns ``lo .. hi-1`` and writes their columns of the batch; the
    global index of column ``lo + j`` (its ``env_ids``, seed, name) is ``g + j``.

    ``bufs`` holds full-size views: ``observation_full``, ``prev_action_full`` and
    ``prev_reward_full`` are ``[T+1, B]`` (row T carries into the next batch),
    ``action``, ``agent_info``, ``reward``, ``terminated``, ``truncated``, ``done``,
    ``env_info``, optional ``final_observation`` are ``[T, B]``. A worker with a beat (see
    :func:`mark`) records which env it is in; ``restart`` is its restart count (fresh seeds).
    """

    width = 1  # batch columns per env (a vector env has more: see sampling.vector)

    def __init__(self, envs: list, lo: int, bufs: dict, *, batch_T: int, wait: bool,
                 traj_info: Callable[[], TrajInfo], where: str, label: str = "env",
                 spare: dict | None = None, first: int = 0, beat: Any = None,
                 restart: int = 0, start_set: int = 0):
        self.envs = envs
        self.label = label  # "env" or "eval env"
        n = self.n = len(envs) * self.width  # columns: j below is a column of this slice
        self.lo, self.hi = lo, lo + n  # its columns of the buffers
        # ``first`` is the global index of the buffers' column 0 (rank r's training envs
        # start at r * batch_B; eval envs after every rank's training envs). Seeds,
        # decorrelation, episode order and messages follow global indices, so ranks add up
        # to one sampler.
        self.g = first + lo
        self.restart_count = restart
        self.beat = beat
        self.batch_T = batch_T
        self.wait = wait
        self.new_traj = traj_info
        self.where = where  # "worker 1" or "serial sampler", for error messages
        self.names = [env_name(self.g + j, label=label, where=where) for j in range(n)]
        # One set of views per set of batch buffers (a second one, ``spare``, with
        # policy_lag: batches alternate between them).
        self._sets = [self._bind(b) for b in ([bufs] if spare is None else [bufs, spare])]
        self._prev = start_set  # the set whose row T the next batch starts from
        self.use(start_set)  # a replacement writes where the next batch looks
        self.act_discrete = bufs["action"].ndim == 2 and bufs["action"].dtype.kind in "iub"
        self.keep_final = "final_observation" in bufs
        self.ended: list = []          # (env, final observation, terminated, truncated) per step
        self.ended_as = [(False, False)] * n  # wait mode: (terminated, truncated) of the end
        self.trajs = [traj_info() for _ in range(n)]
        # Stats that only need rewards (TrajInfo's update and terminate, not overridden)
        # are added at the end of the batch from one list of the batch's rewards: per
        # episode that saves a Segment, its views and a tolist (~1.5 us of a random
        # CartPole episode's ~22 steps). Other classes get update(segment) as each episode ends.
        self.deferred = n > 0 and _keeps_trajinfo_hooks(self.trajs[0])
        self.segments: list = []     # deferred: (TrajInfo, column, t0, t1) to add at batch end
        self.ep_start = [0] * n      # step where each open episode's segment begins
        self.waiting = [False] * n   # wait mode: ended this batch, not stepped again
        self.completed: list = []    # (t, global env, TrajInfo) finished this batch

    def name(self, v: int) -> str:
        """Env object v's name alone (where an error happened: its header says who). Env
        objects are columns here; VectorCollector names a vector env."""
        return env_name(self.g + v, label=self.label)

    def _bind(self, bufs: dict) -> Views:
        """The views of this slice into one set of batch buffers."""
        sl, T, n = slice(self.lo, self.hi), self.batch_T, self.n
        cols = {k: tree_map(lambda a: a[:, sl], v) for k, v in bufs.items()
                if k not in ("bootstrap_value", "env_ids")}
        cols["observation"] = cols["observation_full"]
        c, obs = cols, cols["observation_full"]
        rows = [Row(c["action"][t], c["reward"][t], c["terminated"][t], c["truncated"][t],
                    c["done"][t], c["prev_action_full"][t + 1], c["prev_reward_full"][t + 1])
                for t in range(T)]
        obs_rows = [None] * (T + 1)
        if not is_tree(obs) and obs.ndim == 3:
            try:
                obs_rows = [[memoryview(r) for r in obs[t]] for t in range(T + 1)]
            except (TypeError, ValueError, BufferError):  # dtypes without a buffer format
                pass
        return Views(
            bufs=bufs, cols=cols, rows=rows, obs_rows=obs_rows,
            rewards=[memoryview(c["reward"][t]) for t in range(T)],
            env_cols=[{k: tree_map(lambda a, j=j: a[:, j], v) for k, v in c.items()}
                      for j in range(n)],
            info_leaves=[(path, arr, _DIRECT.get(arr.dtype.str, ()))
                         for path, arr in tree_leaves(c["env_info"])])

    def use(self, i: int) -> None:
        """Collect the next batch into buffer set ``i`` (it starts from the last one's row
        T, see :meth:`begin_batch`)."""
        self.views = self._sets[i]
        self.cols = self.views.cols
        self._cur = i

    # -- start -------------------------------------------------------------------------
    def reset_all(self, seed: int, max_decorrelation_steps: int) -> None:
        """First (seeded) reset of every env (a vector env's sub-env b: ``seed + b``), then
        optional random-action decorrelation."""
        self._reset_each(self.batch_T, RESET, "the first reset", seed)
        for v in range(len(self.envs) if max_decorrelation_steps > 0 else 0):
            mark(self.beat, DECORRELATE, 0, v * self.width)
            tagged(self._decorrelate, f"decorrelation of {self.name(v)}",
                   v, seed, max_decorrelation_steps)

    def restart(self, seed: int, first: bool) -> None:
        """Reset every env for an evaluation (seeded ``seed + b`` the first time) into row 1
        (begin_batch carries it to row 0)."""
        self._reset_each(1, EVAL_RESET, "the reset", seed if first else None,
                         " before an evaluation")
        self.cols["done"][...] = False
        self.waiting = [False] * self.n
        self.trajs = [self.new_traj() for _ in range(self.n)]

    def _reset_each(self, row: int, phase: int, what: str, seed: int | None,
                    after: str = "") -> None:
        """Reset every env object into ``row`` (column j seeded ``env_seed(seed, g + j,
        restart)``, unless ``seed`` is None) and zero that row of prev_action/prev_reward."""
        for v in range(len(self.envs)):
            mark(self.beat, phase, 0, v * self.width)
            seeds = None if seed is None else [env_seed(seed, self.g + j, self.restart_count)
                                               for j in range(v * self.width, (v + 1) * self.width)]
            self._reset(v, row, what, seeds, after)
        self.cols["prev_action_full"][row] = 0
        self.cols["prev_reward_full"][row] = 0

    def _reset(self, v: int, row: int, what: str, seeds: list | None, after: str = "") -> None:
        """Reset env v (seeded with ``seeds[0]``, if given) into ``row``; errors tagged."""
        kw = {} if seeds is None else {"seed": seeds[0]}
        o = tagged(self.envs[v].reset, f"{what} of {self.name(v)}{after}", **kw)[0]
        self.write_obs(row, v, o, when=what.replace("the", "its", 1))

    def _decorrelate(self, j: int, seed: int, max_steps: int) -> None:
        env, T = self.envs[j], self.batch_T
        # independent of kind and worker count
        rng = np.random.default_rng(stream_key(seed, self.g + j, 0xDEC0, self.restart_count))
        n_steps = int(rng.integers(0, max_steps + 1))
        random_action = random_action_fn(env.action_space, rng)
        steps: list = []  # the open episode's (observation, action, reward, terminated, truncated)
        obs = tree_map(lambda a: a[T, j].copy(), self.cols["observation_full"])
        for i in range(n_steps):
            mark(self.beat, DECORRELATE, i, j)
            a = tree_map(lambda x: x[0], random_action(1))
            o, r, te, tr, _info = env.step(a.item() if self.act_discrete else a)
            r = check_reward(r, self.names[j], "decorrelation")
            te = check_flag(te, "terminated", self.names[j], "decorrelation")
            tr = check_flag(tr, "truncated", self.names[j], "decorrelation")
            steps.append((obs, a, r, te, tr))
            obs = o
            if te or tr:
                steps = []
                obs, _ = env.reset()
        self.write_obs(T, j, obs)
        self.cols["prev_action_full"][T, j] = steps[-1][1] if steps else 0
        self.cols["prev_reward_full"][T, j] = steps[-1][2] if steps else 0.0
        if steps:  # the open episode keeps its decorrelation steps in its stats
            fields = ("observation", "action", "reward", "terminated", "truncated")
            source = dict(zip(fields, map(stack, zip(*steps))))
            source["env_info"], source["agent_info"] = {}, {}
            self.trajs[j].update(Segment(source, 0, len(steps)))

    # -- one batch ---------------------------------------------------------------------
    def begin_batch(self) -> None:
        """Carry the last batch's row T into row 0 (resetting envs that wait, in wait
        mode)."""
        c, T = self.cols, self.batch_T
        last = self._sets[self._prev].cols  # the same set unless batches alternate
        for (_, src), (_, dst) in zip(tree_leaves(last["observation_full"]),
                                      tree_leaves(c["observation_full"])):
            dst[0] = src[T]
        c["prev_action_full"][0] = last["prev_action_full"][T]
        c["prev_reward_full"][0] = last["prev_reward_full"][T]
        if last is not c:  # an agent reads done[-1] at step 0: which episodes start now
            c["done"][T - 1] = last["done"][T - 1]
        self._prev = self._cur
        if self.wait:
            for j, w in enumerate(self.waiting):
                if w:
                    mark(self.beat, BATCH_RESET, 0, j)
                    o = tagged(self.envs[j].reset, f"the reset of {self.name(j)} before a "
                                                   f"batch")[0]
                    self.write_obs(0, j, o)
                    c["prev_action_full"][0, j] = 0
                    c["prev_reward_full"][0, j] = 0
                    self.waiting[j] = False
        if self.keep_final:
            for _, arr in tree_leaves(c["final_observation"]):
                arr[...] = 0
        self.completed = []
        self.segments.clear()  # left by a batch an error cut short
        self.ep_start = [0] * self.n

    def step_envs(self, t: int) -> None:
        """Step every env with ``action[t]`` and record the results in rows t and t+1.

        One loop for every case. Per env, the usual case costs the step, a type test of
        the reward and the flags, a float32 store of the reward and a memoryview copy of the
        observation; the rest (a wrong type's check, an episode's end, wait mode, env_info)
        is taken only where it applies."""
        views = self.views
        row, rewards, nxt = views.rows[t], views.rewards[t], views.obs_rows[t + 1]
        acts = row.action.tolist() if self.act_discrete else list(row.action.copy())
        ended, beat, waiting, info_leaves = self.ended, self.beat, self.waiting, views.info_leaves
        wait, real = self.wait, REWARD_TYPES
        ended.clear()
        # Row t-1 of done stays as it is until here: an agent reads it at step t (at t=0,
        # the last row of the previous batch) to learn which episodes start.
        row.terminated.fill(False)
        row.truncated.fill(False)
        row.done.fill(False)
        j = 0
        try:
            for j, env in enumerate(self.envs):
                if wait and waiting[j]:  # its episode ended this batch: zeros, its flags kept
                    rewards[j] = 0.0
                    row.terminated[j], row.truncated[j] = self.ended_as[j]
                    row.done[j] = True
                    self.zero_obs(t + 1, j)
                    for _, arr, _ in info_leaves:
                        arr[t, j] = 0
                    continue
                if beat is not None:
                    beat[BEAT_ENV] = j
                o, r, te, tr, info = env.step(acts[j])
                # Type tests, not conversions: a wrong type takes the checked path.
                try:
                    rewards[j] = r if r.__class__ in real else check_reward(
                        r, self.names[j], f"step {t} of the batch")
                except ValueError:  # an int beyond float32: end_batch refuses what it became
                    rewards[j] = float("inf")
                if (te is not False and te is not True) or (tr is not False and tr is not True):
                    when = f"step {t} of the batch"
                    te, tr = (check_flag(te, "terminated", self.names[j], when),
                              check_flag(tr, "truncated", self.names[j], when))
                if info_leaves:
                    self._write_env_info(t, j, info)
                if te or tr:
                    ended.append((j, o, te, tr))
                    if self.keep_final:
                        self.write_obs(t, j, o, field="final_observation",
                                       when=f"step {t} of the batch")
                    if wait:  # zeros until the next batch
                        waiting[j] = True
                        self.ended_as[j] = (te, tr)
                        self.zero_obs(t + 1, j)
                        continue
                    o = env.reset()[0]
                try:
                    nxt[j][:] = o
                except (TypeError, ValueError):  # not an array of this shape and dtype
                    self.write_obs(t + 1, j, o, when=f"step {t} of the batch")
        except Exception as e:
            tag(e, f"{self.name(j)}, step {t} of the batch")
            raise
        self._finish_step(t)

    def _finish_step(self, t: int, flags: bool = True) -> None:
        """Rows t+1 of prev_action/prev_reward, and the episodes that ended at step t (and,
        with ``flags``, their terminated, truncated and done)."""
        row, env_cols = self.views.rows[t], self.views.env_cols
        row.next_prev_action[...] = row.action
        row.next_prev_reward[...] = row.reward
        for j, final, te, tr in self.ended:
            if flags:
                row.terminated[j] = te
                row.truncated[j] = tr
                row.done[j] = True
            row.next_prev_action[j] = 0
            row.next_prev_reward[j] = 0
            traj = self.trajs[j]
            if self.deferred:
                self.segments.append((traj, j, self.ep_start[j], t + 1))
            else:
                traj.update(Segment(env_cols[j], self.ep_start[j], t + 1))
            self.completed.append((t, self.g + j, traj.terminate(final)))
            self.trajs[j] = self.new_traj()
            self.ep_start[j] = t + 1

    def end_batch(self) -> list:
        """Add the open episodes' last segments to their stats; return finished episodes.
        Refuses rewards that were not stored as finite float32 (one check per batch)."""
        reward = self.cols["reward"]
        if not np.isfinite(reward).all():
            t, j = (int(i) for i in np.argwhere(~np.isfinite(reward))[0])
            e = ValueError(
                f"{self.names[j]} returned a reward at step {t} of the batch that is stored "
                f"as {reward[t, j]} in float32: inf and nan are not real numbers, and a finite "
                f"reward beyond float32's range (±3.4e38) would become one. Return finite "
                f"rewards within that range (scale or clip them in the env or a wrapper)")
            e.sampling_step = t  # the row it happened in (a restart cuts the batch there)
            raise e
        env_cols, T, segments = self.views.env_cols, self.batch_T, self.segments
        for j in range(self.n):
            if not self.waiting[j] and self.ep_start[j] < T:
                if self.deferred:
                    segments.append((self.trajs[j], j, self.ep_start[j], T))
                else:
                    self.trajs[j].update(Segment(env_cols[j], self.ep_start[j], T))
        if segments:
            rewards = reward.T.tolist()  # per column, its T rewards as Python floats
            for traj, j, t0, t1 in segments:
                traj.add_rewards(rewards[j][t0:t1])
            segments.clear()
        return self.completed

    # -- writing one env's observation / info ------------------------------------------
    def zero_obs(self, row: int, j: int) -> None:
        """Zeros for env j's observation in ``row`` (wait mode, after its episode ended)."""
        for _, arr in tree_leaves(self.cols["observation_full"]):
            arr[row, j] = 0

    def write_obs(self, row: int, j: int, o: Any, field: str = "observation_full",
                  name: str = "observation", when: str | None = None) -> None:
        """Write env j's observation into ``field[row, j]``, checked (``name``: what the
        env returned it as, and ``when``, for messages)."""
        for path, arr in tree_leaves(self.cols[field]):
            arr[row, j] = checked_leaf(o, path, arr.shape[2:], arr.dtype, self.names[j],
                                       name, "as on its first observation", when)

    def _write_env_info(self, t: int, j: int, info: Any) -> None:
        when = f"step {t} of the batch"
        if not isinstance(info, dict):
            raise TypeError(not_a_dict(self.names[j], "info", info, when))
        for path, arr, direct in self.views.info_leaves:
            try:
                v = get(info, path, strict=True)
            except LookupError:
                raise ValueError(missing_entry(self.names[j], f"env_info{path_text(path)}",
                                               when)) from None
            if v.__class__ in direct:
                try:
                    arr[t, j] = v
                    continue
                except OverflowError:  # an int beyond int64: the checked path says so
                    pass
            arr[t, j] = checked_value(v, arr.shape[2:], arr.dtype, self.names[j],
                                      f"env_info{path_text(path)}", when, "the probe step")


def checked_leaf(tree: Any, path: tuple, shape: tuple, dtype: np.dtype, who: str,
                 name: str, like: str, when: str | None = None) -> np.ndarray:
    """The array at ``path`` of an observation ``tree``, checked to be exactly ``shape`` and
    ``dtype`` (observations are never cast); a ValueError naming ``who``, the field and
    ``when`` otherwise. ``like`` says where that shape came from."""
    field = name + path_text(path)
    try:
        v = get(tree, path, strict=True)
    except LookupError:
        v, got = None, "no such entry"
    else:
        got = f"a {type(v).__name__}" if is_tree(v) else None
    a = v if got is not None or isinstance(v, np.ndarray) else np.asarray(v)
    if got is None and (a.shape != shape or a.dtype != dtype):
        got = describe(a)
    if got is not None:
        at = f" at {when}" if when else ""
        raise ValueError(f"{who} returned {field} with {got}{at}, expected shape {shape} "
                         f"dtype {dtype} {like}; an env must keep the shape and dtype of "
                         f"every observation field (cast it in the env or a wrapper)")
    return a


def checked_value(v: Any, shape: tuple, dtype: np.dtype, who: str, field: str, when: str,
                  like: str) -> np.ndarray:
    """``v`` as an array to store in a ``shape``/``dtype`` leaf, checked: the same shape and
    a cast that changes no value (:func:`~sampling.buffers.cast_problem`); a TypeError naming
    ``who``, ``field`` and ``when`` otherwise."""
    a = v if isinstance(v, np.ndarray) else np.asarray(v)
    problem = f"shape {a.shape}" if a.shape != shape else cast_problem(a, dtype)
    if problem:
        raise TypeError(f"{who} returned {field}={v!r:.80} at {when}: {problem}; expected "
                        f"{dtype} of shape {shape} as on {like} (keep each entry's type: "
                        f"cast it in the env or a wrapper)")
    return a
