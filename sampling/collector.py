"""Episode stats, and the collector that steps a slice of envs into its columns of a batch.

Imports numpy and :mod:`sampling.buffers`, :mod:`sampling.spaces`. The collector is
the same object in the serial sampler and in every worker process: kinds differ in who
calls the agent between two :meth:`Collector.step_envs` calls, never in how envs step.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .buffers import is_tree, tree_leaves, tree_map
from .errors import tag, tagged
from .spaces import random_action_fn

__all__ = ["TrajInfo", "Segment", "Collector"]


class Segment:
    """Consecutive steps ``t0 .. t1-1`` of one env, as views into the batch.

    Attributes (``[t1 - t0, ...]`` arrays, dicts where the batch has dicts):
    ``observation``, ``action``, ``reward``, ``terminated``, ``truncated``,
    ``agent_info``, ``env_info``. Views are built on first access.
    """

    __slots__ = ("_src", "_idx")

    def __init__(self, source: dict, t0: int, t1: int, b: int):
        self._src = source
        self._idx = (slice(t0, t1), b)

    def __len__(self) -> int:
        return self._idx[0].stop - self._idx[0].start

    def __getattr__(self, name: str) -> Any:
        try:
            arr = self._src[name]
        except KeyError:
            raise AttributeError(name) from None
        if is_tree(arr):
            return tree_map(lambda a: a[self._idx], arr)
        return arr[self._idx]


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
        # Python floats: an episode's segment is short, and numpy's per-call cost would
        # make these stats the most expensive thing the sampler does per episode.
        r = segment.reward.tolist()
        n = len(r)
        self.Length += n
        self.Return += sum(r)
        self.NonzeroRewards += n - r.count(0.0)
        discount, d, acc = self._discount, self._cur_discount, 0.0
        for x in r:
            acc += d * x
            d *= discount
        self.DiscountedReturn += acc
        self._cur_discount = d

    def terminate(self, final_observation: Any) -> TrajInfo:
        return self

    def stats(self) -> dict:
        """The public attributes as a dict."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.stats().items())})"


class Collector:
    """Owns envs ``lo .. hi-1`` (global indices) and writes their columns of the batch.

    ``bufs`` holds full-size views: ``observation_full``, ``prev_action_full`` and
    ``prev_reward_full`` are ``[T+1, B]`` (row T carries into the next batch),
    ``action``, ``agent_info``, ``reward``, ``terminated``, ``truncated``, ``done``,
    ``env_info``, optional ``final_observation`` are ``[T, B]``.
    """

    def __init__(self, envs: list, lo: int, bufs: dict, *, batch_T: int, wait: bool,
                 traj_info: Callable[[], TrajInfo], where: str, label: str = "env"):
        self.envs = envs
        self.label = label  # "env" or "eval env": how messages name env lo + j
        self.lo, self.hi = lo, lo + len(envs)
        self.T = batch_T
        self.wait = wait
        self.new_traj = traj_info
        self.where = where  # "worker 1" or "serial", for error messages
        sl = slice(self.lo, self.hi)
        self.bufs = bufs
        # Column views of this slice, named like the batch fields (Segment reads these).
        self.cols = {k: tree_map(lambda a: a[:, sl], v) for k, v in bufs.items()
                     if k not in ("bootstrap_value", "env_ids")}
        self.cols["observation"] = self.cols["observation_full"]
        obs = self.cols["observation_full"]
        self.obs_tree = is_tree(obs)
        # Views made once, so the per-step loop allocates none: per step, the fields it
        # writes; per step and env, the observation row (array observations only).
        c = self.cols
        self.rows = [(c["action"][t], c["reward"][t], c["terminated"][t], c["truncated"][t],
                      c["done"][t], c["prev_action_full"][t + 1], c["prev_reward_full"][t + 1])
                     for t in range(batch_T)]
        if self.obs_tree or obs.ndim == 2:  # dicts, and scalar observations (no row views)
            self.obs_rows = [None] * (batch_T + 1)
            self.obs_shape = self.obs_dtype = None
        else:
            self.obs_rows = [list(obs[t]) for t in range(batch_T + 1)]
            self.obs_shape, self.obs_dtype = obs.shape[2:], obs.dtype
        self.obs_leaves = list(tree_leaves(obs))
        self.info_leaves = [(path, arr) for path, arr in tree_leaves(self.cols["env_info"])]
        self.act_discrete = bufs["action"].ndim == 2 and bufs["action"].dtype.kind in "iub"
        n = len(envs)
        self.rews, self.terms, self.truncs = [0.0] * n, [False] * n, [False] * n
        self.trajs = [traj_info() for _ in range(n)]
        self.ep_start = [0] * n      # step where each open episode's segment begins
        self.waiting = [False] * n   # wait mode: ended this batch, not stepped again
        self.completed: list = []    # (t, global env, TrajInfo) finished this batch

    # -- start -------------------------------------------------------------------------
    def reset_all(self, seed: int, max_decorrelation_steps: int) -> None:
        """First (seeded) reset of every env, then optional random-action decorrelation."""
        T = self.T
        for j, env in enumerate(self.envs):
            o, _ = tagged(env.reset, f"the first reset of {self.label} {self.lo + j}",
                          seed=seed + self.lo + j)
            self.write_obs(T, j, o)
        self.cols["prev_action_full"][T] = 0
        self.cols["prev_reward_full"][T] = 0
        for j in range(len(self.envs) if max_decorrelation_steps > 0 else 0):
            tagged(self._decorrelate, f"decorrelation of {self.label} {self.lo + j}",
                   j, seed, max_decorrelation_steps)

    def _decorrelate(self, j: int, seed: int, max_steps: int) -> None:
        env, b, T = self.envs[j], self.lo + j, self.T
        rng = np.random.default_rng([seed, b, 0xDEC0])  # independent of kind and worker count
        n_steps = int(rng.integers(0, max_steps + 1))
        random_action = random_action_fn(env.action_space, rng)
        record: dict = {"observation": [], "action": [], "reward": [], "terminated": [],
                        "truncated": []}
        obs = tree_map(lambda a: a[T, j].copy(), self.cols["observation_full"])
        last_a, last_r = None, 0.0
        for _ in range(n_steps):
            a = tree_map(lambda x: x[0], random_action(1))
            o, r, te, tr, _info = env.step(a.item() if self.act_discrete else a)
            for k, v in zip(record, (obs, a, r, te, tr)):
                record[k].append(v)
            last_a, last_r, obs = a, r, o
            if te or tr:
                record = {k: [] for k in record}
                last_a, last_r = None, 0.0
                obs, _ = env.reset()
        self.write_obs(T, j, obs)
        self.cols["prev_action_full"][T, j] = 0 if last_a is None else last_a
        self.cols["prev_reward_full"][T, j] = last_r
        if record["reward"]:  # the open episode keeps its decorrelation steps in its stats
            source = {k: tree_map(lambda a: a[:, None], _stack(v)) for k, v in record.items()}
            source["env_info"], source["agent_info"] = {}, {}
            self.trajs[j].update(Segment(source, 0, len(record["reward"]), 0))

    # -- one batch ---------------------------------------------------------------------
    def begin_batch(self) -> None:
        """Carry the last row into row 0 (resetting envs that wait, in wait mode)."""
        c, T = self.cols, self.T
        if self.wait:
            for j, w in enumerate(self.waiting):
                if w:
                    o, _ = tagged(self.envs[j].reset, f"the reset of {self.label} {self.lo + j}")
                    self.write_obs(T, j, o)
                    c["prev_action_full"][T, j] = 0
                    c["prev_reward_full"][T, j] = 0
                    self.waiting[j] = False
        for _, arr in tree_leaves(c["observation_full"]):
            arr[0] = arr[T]
        c["prev_action_full"][0] = c["prev_action_full"][T]
        c["prev_reward_full"][0] = c["prev_reward_full"][T]
        if "final_observation" in c:
            for _, arr in tree_leaves(c["final_observation"]):
                arr[...] = 0
        self.completed = []
        self.ep_start = [0] * len(self.envs)

    def step_envs(self, t: int) -> None:
        """Step every env with ``action[t]`` and record the results in rows t and t+1."""
        action, reward, term, trunc, done, prev_action, prev_reward = self.rows[t]
        acts = action.tolist() if self.act_discrete else list(action.copy())
        rews, terms, truncs, waiting = self.rews, self.terms, self.truncs, self.waiting
        ended = []
        info_leaves = self.info_leaves
        nxt = self.obs_rows[t + 1]  # per-env row views; None for dict observations
        shape, dtype = self.obs_shape, self.obs_dtype
        j = 0
        try:
            for j, env in enumerate(self.envs):
                if waiting[j]:  # wait mode: keep terminated/truncated, record zeros
                    rews[j] = 0.0
                    self.write_obs(t + 1, j, None)
                    for _, arr in info_leaves:
                        arr[t, j] = 0
                    continue
                o, r, te, tr, info = env.step(acts[j])
                rews[j] = r
                terms[j] = te
                truncs[j] = tr
                if info_leaves:
                    self._write_env_info(t, j, info)
                if te or tr:
                    ended.append((j, o))
                    o = self._end_episode(t, j, o)
                if nxt is not None and o.__class__ is np.ndarray and o.shape == shape and (
                        o.dtype is dtype or o.dtype == dtype):
                    nxt[j][...] = o
                else:
                    self.write_obs(t + 1, j, o)
        except Exception as e:
            tag(e, f"{self.label} {self.lo + j}, step {t} of the batch")
            raise
        try:
            reward[...] = rews
        except (TypeError, ValueError) as e:
            raise TypeError(f"{self.where}: a {self.label} in {self.lo}..{self.hi - 1} returned a "
                            f"non-numeric reward at step {t}: {rews}") from e
        term[...] = terms
        trunc[...] = truncs
        np.logical_or(term, trunc, out=done)
        prev_action[...] = action
        prev_reward[...] = reward
        for j, final in ended:
            prev_action[j] = 0
            prev_reward[j] = 0
            traj = self.trajs[j]
            traj.update(Segment(self.cols, self.ep_start[j], t + 1, j))
            self.completed.append((t, self.lo + j, traj.terminate(final)))
            self.trajs[j] = self.new_traj()
            self.ep_start[j] = t + 1

    def _end_episode(self, t: int, j: int, o: Any) -> Any:
        if "final_observation" in self.cols:
            self.write_obs(t, j, o, field="final_observation")
        if self.wait:
            self.waiting[j] = True
            return None
        o, _ = self.envs[j].reset()
        return o

    def end_batch(self) -> list:
        """Add the open episodes' last segments to their stats; return finished episodes."""
        for j in range(len(self.envs)):
            if not self.waiting[j] and self.ep_start[j] < self.T:
                self.trajs[j].update(Segment(self.cols, self.ep_start[j], self.T, j))
        return self.completed

    # -- writing one env's observation / info ------------------------------------------
    def write_obs(self, row: int, j: int, o: Any, field: str = "observation_full") -> None:
        """Write env j's observation (None means zeros) into ``field[row, j]``, checked."""
        dst = self.cols[field]
        if o is None:
            for _, arr in tree_leaves(dst):
                arr[row, j] = 0
            return
        if is_tree(dst) != isinstance(o, dict):
            self._bad(j, "observation", f"a {type(o).__name__}", "a dict" if is_tree(dst)
                      else "an array")
        for path, arr in tree_leaves(dst):
            v = o
            for k in path:
                if not isinstance(v, dict) or k not in v:
                    self._bad(j, _field("observation", path), "no such key", "an array")
                v = v[k]
            a = v if isinstance(v, np.ndarray) else np.asarray(v)
            want = arr[row, j]
            if a.shape != want.shape or a.dtype != want.dtype:
                self._bad(j, _field("observation", path), f"shape {a.shape} dtype {a.dtype}",
                          f"shape {want.shape} dtype {want.dtype}")
            arr[row, j] = a

    def _bad(self, j: int, field: str, got: str, want: str):
        raise ValueError(
            f"{self.label} {self.lo + j} ({self.where}) returned {field} with {got}, expected "
            f"{want} as on its first observation; an env must keep the shape and dtype of every "
            f"observation field (cast it in the env or a wrapper)")

    def _write_env_info(self, t: int, j: int, info: dict) -> None:
        for path, arr in self.info_leaves:
            v = info
            for k in path:
                v = v.get(k, 0) if isinstance(v, dict) else 0
            try:
                arr[t, j] = v
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"{self.label} {self.lo + j} ({self.where}) returned env_info "
                    f"{'/'.join(path)!r}={v!r} at step {t}; expected {arr.dtype} of shape "
                    f"{arr.shape[2:]} as on the probe step") from e


def _field(name: str, path: tuple) -> str:
    return name + "".join(f"[{k!r}]" for k in path)


def _stack(values: list) -> Any:
    if values and isinstance(values[0], dict):
        return {k: _stack([v[k] for v in values]) for k in values[0]}
    return np.stack([np.asarray(v) for v in values])
