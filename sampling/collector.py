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
        # Python floats: an episode's segment is short, and numpy's per-call cost would
        # make these stats the most expensive thing the sampler does per episode.
        r = segment.reward.tolist()
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
        # Per step and env, a memoryview of the observation row (1-D array observations):
        # assigning an array to it copies without a numpy call and raises unless shape and
        # dtype (buffer format) match exactly, so the check costs nothing on the usual path.
        self.obs_rows = [None] * (batch_T + 1)
        if not self.obs_tree and obs.ndim == 3:
            try:
                self.obs_rows = [[memoryview(r) for r in obs[t]] for t in range(batch_T + 1)]
            except (TypeError, ValueError, BufferError):  # dtypes without a buffer format
                pass
        # Per env, its fields as [time, ...] views: what a Segment of its episode slices.
        self.env_cols = [{k: tree_map(lambda a, j=j: a[:, j], v) for k, v in c.items()}
                         for j in range(len(envs))]
        self.obs_leaves = list(tree_leaves(obs))
        self.info_leaves = [(path, arr) for path, arr in tree_leaves(self.cols["env_info"])]
        self.act_discrete = bufs["action"].ndim == 2 and bufs["action"].dtype.kind in "iub"
        n = len(envs)
        self.rews = [0.0] * n
        self.ended: list = []          # (env, final observation, terminated, truncated) per step
        self.ended_as = [(False, False)] * n  # wait mode: (terminated, truncated) of the end
        # The loop without wait mode, env_info or non-array observations (see step_envs).
        self.fast = not wait and not self.info_leaves and self.obs_rows[1] is not None
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
            source = {k: _stack(v) for k, v in record.items()}
            source["env_info"], source["agent_info"] = {}, {}
            self.trajs[j].update(Segment(source, 0, len(record["reward"])))

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
        rews, ended = self.rews, self.ended
        ended.clear()
        # Row t-1 of done stays as it is until here: an agent reads it at step t (at t=0,
        # the last row of the previous batch) to learn which episodes start.
        term.fill(False)
        trunc.fill(False)
        done.fill(False)
        j = 0
        try:
            if self.fast:
                # The usual case (reset mode, array observations, no env_info): per env, the
                # step, a list store and the observation copy; the rest is per step or per
                # episode.
                nxt = self.obs_rows[t + 1]
                keep_final = "final_observation" in self.cols
                for j, env in enumerate(self.envs):
                    o, rews[j], te, tr, _ = env.step(acts[j])
                    if te or tr:
                        ended.append((j, o, te, tr))
                        o = self._end_episode(t, j, o, te, tr) if keep_final else env.reset()[0]
                    try:
                        nxt[j][:] = o
                    except (TypeError, ValueError):  # not an array of this shape and dtype
                        self.write_obs(t + 1, j, o)
            else:
                self._step_general(t, acts)  # tags its own errors
        except Exception as e:
            tag(e, f"{self.label} {self.lo + j}, step {t} of the batch")
            raise
        try:
            reward[...] = rews
        except (TypeError, ValueError) as e:
            raise TypeError(f"{self.where}: a {self.label} in {self.lo}..{self.hi - 1} returned a "
                            f"non-numeric reward at step {t}: {rews}") from e
        prev_action[...] = action
        prev_reward[...] = reward
        for j, final, te, tr in ended:
            term[j] = te
            trunc[j] = tr
            done[j] = True
            prev_action[j] = 0
            prev_reward[j] = 0
            traj = self.trajs[j]
            traj.update(Segment(self.env_cols[j], self.ep_start[j], t + 1))
            self.completed.append((t, self.lo + j, traj.terminate(final)))
            self.trajs[j] = self.new_traj()
            self.ep_start[j] = t + 1

    def _step_general(self, t: int, acts: list) -> None:
        """:meth:`step_envs`' loop with wait mode, env_info and any observation type."""
        rews, ended, waiting, ended_as = self.rews, self.ended, self.waiting, self.ended_as
        _, _, term, trunc, done, _, _ = self.rows[t]
        info_leaves = self.info_leaves
        nxt = self.obs_rows[t + 1]  # per-env memoryviews of row t+1, or None
        j = 0
        try:
            for j, env in enumerate(self.envs):
                if waiting[j]:  # wait mode: keep terminated/truncated, record zeros
                    rews[j] = 0.0
                    term[j], trunc[j] = ended_as[j]
                    done[j] = True
                    self.zero_obs(t + 1, j)
                    for _, arr in info_leaves:
                        arr[t, j] = 0
                    continue
                o, rews[j], te, tr, info = env.step(acts[j])
                if info_leaves:
                    self._write_env_info(t, j, info)
                if te or tr:
                    ended.append((j, o, te, tr))
                    o = self._end_episode(t, j, o, te, tr)
                    if o is None:  # wait mode: zeros until the next batch
                        self.zero_obs(t + 1, j)
                        continue
                if nxt is None:
                    self.write_obs(t + 1, j, o)
                else:
                    try:
                        nxt[j][:] = o
                    except (TypeError, ValueError):  # not an array of this shape and dtype
                        self.write_obs(t + 1, j, o)
        except Exception as e:
            tag(e, f"{self.label} {self.lo + j}, step {t} of the batch")
            raise

    def _end_episode(self, t: int, j: int, o: Any, te: Any, tr: Any) -> Any:
        if "final_observation" in self.cols:
            self.write_obs(t, j, o, field="final_observation")
        if self.wait:
            self.waiting[j] = True
            self.ended_as[j] = (te, tr)
            return None
        o, _ = self.envs[j].reset()
        return o

    def end_batch(self) -> list:
        """Add the open episodes' last segments to their stats; return finished episodes."""
        for j in range(len(self.envs)):
            if not self.waiting[j] and self.ep_start[j] < self.T:
                self.trajs[j].update(Segment(self.env_cols[j], self.ep_start[j], self.T))
        return self.completed

    # -- writing one env's observation / info ------------------------------------------
    def zero_obs(self, row: int, j: int) -> None:
        """Zeros for env j's observation in ``row`` (wait mode, after its episode ended)."""
        for _, arr in tree_leaves(self.cols["observation_full"]):
            arr[row, j] = 0

    def write_obs(self, row: int, j: int, o: Any, field: str = "observation_full") -> None:
        """Write env j's observation into ``field[row, j]``, checked."""
        dst = self.cols[field]
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
