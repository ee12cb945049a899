"""Vector envs: one env object that steps ``num_envs`` sub-envs in one call, filling as many
consecutive columns of the batch.

Imports buffers, collector, errors, spaces and tree. The sampler recognises a vector env by
duck typing (``num_envs`` and ``single_action_space``, as gymnasium's ``VectorEnv`` has), so
gymnasium stays optional. :class:`VectorCollector` is a :class:`~sampling.collector.Collector` whose
per-step work is per vector env, not per sub-env: one ``step`` call and one checked numpy
write per field; only sub-envs whose episode ended get per-env work (their episode stats,
their final observation, and a masked reset in ``Disabled`` mode).

Autoreset: a vector env must say in ``metadata["autoreset_mode"]`` how it restarts a
sub-env whose episode ended. ``SameStep`` (the new episode's first observation is returned
at once, the final one is in ``infos["final_obs"]``) and ``Disabled`` (the sampler resets
ended sub-envs with ``reset(options={"reset_mask": done})``) give batches that mean exactly
what they mean for single envs. ``NextStep`` (gymnasium's default) would spend the next
step on the reset and put a transition that never happened into the batch: refused.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .buffers import cast_problem
from .collector import (
    DECORRELATE,
    EVAL_RESET,
    RESET,
    Collector,
    TrajInfo,
    mark,
    stream_key,
)
from .errors import tag, tagged
from .spaces import random_action_fn
from .tree import get, is_tree, path_text, tree_leaves, tree_map

__all__ = ["is_vector", "vector_width", "autoreset_mode", "seeded_reset", "check_vector_step",
           "vector_infos", "VectorCollector", "collector", "env_label", "random_stepper"]

MODES = ("SameStep", "Disabled")  # the autoreset modes the sampler can honour
MAKE_WITH = ("make it with gymnasium.make_vec(..., vectorization_mode='sync', "
             "vector_kwargs={'autoreset_mode': gymnasium.vector.AutoresetMode.SAME_STEP}) "
             "(or DISABLED), or set its metadata['autoreset_mode'] to 'SameStep' or "
             "'Disabled' if it behaves that way")


def is_vector(env: Any) -> bool:
    """Whether ``env`` is a vector env (it has ``num_envs`` and ``single_action_space``)."""
    return hasattr(env, "single_action_space") and hasattr(env, "num_envs")


def vector_width(env: Any) -> int:
    """``env.num_envs`` for a vector env, else 1. Raises ValueError for a ``num_envs`` that
    is not an int >= 1."""
    if not is_vector(env):
        return 1
    n = getattr(env, "num_envs", None)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{type(env).__name__} looks like a vector env (it has "
                         f"single_action_space) but its num_envs is {n!r}, not an int >= 1")
    return int(n)


def autoreset_mode(env: Any, what: str) -> str:
    """The vector env's autoreset mode if the sampler can honour it; else a clear error."""
    mode = (getattr(env, "metadata", None) or {}).get("autoreset_mode")
    value = getattr(mode, "value", mode)  # gymnasium's AutoresetMode enum, or its value
    if value in MODES:
        return value
    if value == "NextStep":
        raise ValueError(
            f"{what} is a vector env in autoreset mode NextStep (gymnasium's default): it "
            f"spends the step after an episode's end on the reset, which would put a "
            f"transition that never happened into the batch. Make the env reset in the same "
            f"step, or not at all: {MAKE_WITH}")
    raise ValueError(
        f"{what} is a vector env whose metadata['autoreset_mode'] is {mode!r}: the sampler "
        f"must know how it restarts a sub-env whose episode ended. {MAKE_WITH[0].upper()}"
        f"{MAKE_WITH[1:]}")


def seeded_reset(env: Any, seeds: list) -> tuple:
    """``env.reset(seed=seeds)``: one seed per sub-env. A vector env whose reset takes one
    int only (e.g. gymnasium's vector entry points) gets ``seeds[0]`` and seeds its
    sub-envs from it as it defines."""
    try:
        return env.reset(seed=list(seeds))
    except Exception as first:
        try:
            return env.reset(seed=seeds[0])
        except Exception:
            raise first from None


def check_vector_step(out: Any, width: int, what: str, when: str | int) -> tuple:
    """A vector env's ``step()`` result, checked: a 5-tuple whose rewards, terminated and
    truncated are ``[width]`` numpy arrays of real numbers and bools (never converted).
    ``when`` is a step of the batch (an int) or says when (for messages)."""
    if out.__class__ is tuple and len(out) == 5:
        _, r, te, tr, _ = out
        if r.__class__ is te.__class__ is tr.__class__ is np.ndarray and (
                r.shape == te.shape == tr.shape == (width,) and r.dtype.kind in "iuf"
                and te.dtype.kind == "b" and tr.dtype.kind == "b"):
            return out
    if isinstance(when, int):
        when = f"step {when} of the batch"
    if not (isinstance(out, tuple) and len(out) == 5):
        raise TypeError(f"{what} returned {type(out).__name__} from step() at {when}; a "
                        f"vector env returns (observations, rewards, terminated, truncated, "
                        f"infos)")
    _, r, te, tr, _ = out
    shape = (width,)
    if r.__class__ is not np.ndarray or r.shape != shape or r.dtype.kind not in "iuf":
        _bad_array(what, "rewards", r, when, width, "real numbers (int or float)")
    for name, x in (("terminated", te), ("truncated", tr)):
        if x.__class__ is not np.ndarray or x.shape != shape or x.dtype != bool:
            _bad_array(what, name, x, when, width, "bools")
    return out


def _bad_array(what: str, field: str, x: Any, when: str, width: int, kind: str):
    got = (f"shape {x.shape} dtype {x.dtype}" if isinstance(x, np.ndarray)
           else f"{type(x).__name__} {x!r:.60}")
    raise TypeError(f"{what} returned {field} {got} at {when}; a vector env returns {field} "
                    f"as a numpy array of {width} {kind}, one per sub-env (num_envs={width})")


def vector_infos(info: Any, width: int, what: str, path: tuple = ()) -> dict:
    """One sub-env's share of a vector env's infos, for the env_info layout: the numeric
    entries that are ``[width, ...]`` arrays, without gymnasium's ``_name`` masks and the
    final observations and infos."""
    if not isinstance(info, dict):
        raise TypeError(f"{what}: step() returned infos{path_text(path)} of type "
                        f"{type(info).__name__}; a vector env's infos is a dict")
    out = {}
    for k, x in info.items():
        if isinstance(k, str) and (k.startswith("_") or k in ("final_obs", "final_info")):
            continue
        if isinstance(x, dict):
            sub = vector_infos(x, width, what, path + (k,))
            if sub:
                out[k] = sub
        elif isinstance(x, np.ndarray) and x.ndim and x.shape[0] == width and \
                x.dtype.kind in "biuf":
            out[k] = x[0]
    return out


class VectorCollector(Collector):
    """A :class:`Collector` over vector envs of ``width`` sub-envs each: vector env ``v``
    fills columns ``lo + v * width`` to ``lo + (v + 1) * width - 1``, and sub-env ``i`` of it
    is the env of column ``lo + v * width + i`` for every purpose (seeds, episode stats,
    ``env_ids``, messages)."""

    def __init__(self, envs: list, lo: int, bufs: dict, *, width: int, batch_T: int,
                 wait: bool, traj_info: Callable[[], TrajInfo], where: str,
                 label: str = "env", spare: dict | None = None, first: int = 0,
                 seed_base: int = 0):
        self.width = width
        self.spans = [(v * width, (v + 1) * width) for v in range(len(envs))]
        super().__init__(envs, lo, bufs, batch_T=batch_T, wait=wait, traj_info=traj_info,
                         where=where, label=label, spare=spare, first=first,
                         seed_base=seed_base)
        if wait:
            raise ValueError("reset_mode='wait' cannot be honoured with vector envs (a bug: "
                             "the sampler refuses it first)")
        self.names = [self._name(v) for v in range(len(envs))]  # for messages
        self.modes = [autoreset_mode(env, self._name(v)) for v, env in enumerate(envs)]
        for v, env in enumerate(envs):
            if vector_width(env) != width:
                raise ValueError(f"{self._name(v)} has num_envs={vector_width(env)}, but "
                                 f"the first env had {width}: every env from env_fn must "
                                 f"have the same num_envs")
        obs = self.cols["observation_full"]
        # Array observations (the usual case) are written with one type test and one copy.
        self.obs_array = None if self.obs_tree else ((width,) + obs.shape[2:], obs.dtype)
        self.keep_final = "final_observation" in self.cols

    def _bind(self, bufs: dict) -> dict:
        views = super()._bind(bufs)
        # Per step and vector env, its views (made once: slicing costs as much as a write):
        # first column, action, reward, terminated, truncated, done, next observation.
        c = views["cols"]
        obs = c["observation_full"]
        views["vrows"] = [[(a, c["action"][t, a:b], c["reward"][t, a:b], c["terminated"][t, a:b],
                            c["truncated"][t, a:b], c["done"][t, a:b],
                            None if is_tree(obs) else obs[t + 1, a:b])
                           for a, b in self.spans] for t in range(self.T)]
        return views

    def _name(self, v: int) -> str:
        a = self.g + v * self.width
        return f"{self.label}s {a}..{a + self.width - 1} (one vector env, {self.where})"

    # -- start -------------------------------------------------------------------------
    def reset_all(self, seed: int, max_decorrelation_steps: int) -> None:
        """First reset of every vector env, sub-env b seeded ``seed + b``; then optional
        decorrelation (see :meth:`_decorrelate`)."""
        T = self.T
        for v, env in enumerate(self.envs):
            a, b = self.spans[v]
            mark(self.beat, RESET, 0, a)
            o, _ = tagged(seeded_reset, f"the first reset of {self._name(v)}", env,
                          [self.seed_of(seed, j) for j in range(a, b)])
            self.write_block(T, v, o, "its first reset")
        self.cols["prev_action_full"][T] = 0
        self.cols["prev_reward_full"][T] = 0
        for v in range(len(self.envs) if max_decorrelation_steps > 0 else 0):
            mark(self.beat, DECORRELATE, 0, self.spans[v][0])
            tagged(self._decorrelate, f"decorrelation of {self._name(v)}", v, seed,
                   max_decorrelation_steps)

    def _decorrelate(self, v: int, seed: int, max_steps: int) -> None:
        """Sub-envs of one vector env step together, so they take the same number of
        random steps, drawn from ``[seed, first column]``; each draws its own random
        actions. These steps are not in any episode's stats."""
        env, (a, b), T = self.envs[v], self.spans[v], self.T
        rng = np.random.default_rng(stream_key(seed, self.g + a, 0xDEC0, self.restart_count))
        n_steps = int(rng.integers(0, max_steps + 1))
        random_action = random_action_fn(env.single_action_space, rng)
        prev_a = np.zeros_like(self.cols["prev_action_full"][T, a:b])
        prev_r = np.zeros(b - a, np.float32)
        for k in range(n_steps):
            mark(self.beat, DECORRELATE, k, a)
            acts = random_action(self.width)
            o, r, te, tr, info = self._checked_step(v, acts, f"decorrelation step {k}")
            done = te | tr
            prev_a[...], prev_r[...] = acts, r
            prev_a[done], prev_r[done] = 0, 0
            self.write_block(T, v, o, f"decorrelation step {k}")
            if done.any() and self.modes[v] == "Disabled":
                self._reset_ended(T, v, done, f"decorrelation step {k}")
        self.cols["prev_action_full"][T, a:b] = prev_a
        self.cols["prev_reward_full"][T, a:b] = prev_r

    def restart(self, seed: int, first: bool) -> None:
        """Reset every vector env for an evaluation (seeded the first time)."""
        for v, env in enumerate(self.envs):
            a, b = self.spans[v]
            mark(self.beat, EVAL_RESET, 0, a)
            if first:
                o, _ = seeded_reset(env, [self.seed_of(seed, j) for j in range(a, b)])
            else:
                o, _ = env.reset()
            self.write_block(1, v, o, "the reset before an evaluation")
        self._restarted()

    # -- one step ----------------------------------------------------------------------
    def step_envs(self, t: int) -> None:
        """Step every vector env with its columns of ``action[t]``; write rows t and t+1
        with one numpy assignment per field; per-episode work for ended sub-envs only."""
        self.ended.clear()
        w, names, beat, obs_form = self.width, self.names, self.beat, self.obs_array
        v = 0
        try:
            for v, (env, (a, act, rew, term, trunc, done, obs)) in enumerate(
                    zip(self.envs, self.vrows[t])):
                if beat is not None:
                    beat[3] = a
                # a copy: an env may keep the actions it gets (the row is overwritten later)
                o, r, te, tr, info = check_vector_step(env.step(act.copy()), w, names[v], t)
                rew[...] = r
                term[...] = te
                trunc[...] = tr
                d = te | tr
                done[...] = d
                if obs is not None and o.__class__ is np.ndarray and (
                        o.shape == obs_form[0] and o.dtype == obs_form[1]):
                    obs[...] = o
                else:
                    self.write_block(t + 1, v, o, f"step {t} of the batch")
                ended = np.count_nonzero(d)
                if self.info_leaves:
                    self._write_infos(t, v, info, d if ended else None)
                if ended:
                    self._ends(t, v, o, te, tr, d, info)
        except Exception as e:
            tag(e, f"{self._name(v)}, step {t} of the batch")
            raise
        self._finish_step(t, flags=False)  # this loop wrote terminated, truncated and done

    def _checked_step(self, v: int, actions: np.ndarray, when: str) -> tuple:
        return check_vector_step(self.envs[v].step(actions), self.width, self.names[v], when)

    def _ends(self, t: int, v: int, o: Any, te: np.ndarray, tr: np.ndarray, done: np.ndarray,
              info: Any) -> None:
        """Per sub-env whose episode ended at step t: its final observation and stats (by
        :meth:`_finish_step`); in Disabled mode, a masked reset of those sub-envs."""
        a = self.spans[v][0]
        ended = done.nonzero()[0].tolist()
        same_step = self.modes[v] == "SameStep"
        if same_step:
            finals = info.get("final_obs") if isinstance(info, dict) else None
            final = [None if finals is None else finals[i] for i in ended]
            if any(f is None for f in final):
                raise ValueError(
                    f"{self._name(v)} ended the episodes of envs "
                    f"{[self.g + a + i for i in ended]} at step {t} but "
                    f"its infos have no 'final_obs' for them: in autoreset mode SameStep a "
                    f"vector env returns each final observation in infos['final_obs'] (where "
                    f"infos['_final_obs'] is True)")
        else:
            final = [tree_map(lambda x, i=i: np.array(x[i]), o) for i in ended]
        for i, f in zip(ended, final):
            j = a + i
            if self.keep_final:
                self.write_obs(t, j, f, field="final_observation",
                               name="infos['final_obs']" if same_step else "observation")
            self.ended.append((j, f, te[i], tr[i]))
        if not same_step:
            tagged(self._reset_ended, f"the masked reset (reset(options={{'reset_mask': "
                   f"...}})) of {self._name(v)} after step {t} of the batch", t + 1, v, done,
                   f"the masked reset after step {t}")

    def _reset_ended(self, row: int, v: int, done: np.ndarray, when: str) -> None:
        """Disabled mode: reset the sub-envs in ``done``; write their new observations."""
        o, _ = self.envs[v].reset(options={"reset_mask": done})
        a, b = self.spans[v]
        for path, src in self._leaves(v, o, when):
            dst = get(self.cols["observation_full"], path)[row, a:b]
            dst[done] = src[done]

    # -- writing blocks ----------------------------------------------------------------
    def write_block(self, row: int, v: int, o: Any, when: str) -> None:
        """Write vector env v's observations ``[width, ...]`` into ``row``, checked."""
        a, b = self.spans[v]
        for path, src in self._leaves(v, o, when):
            get(self.cols["observation_full"], path)[row, a:b] = src

    def _leaves(self, v: int, o: Any, when: str) -> list:
        """``(path, array)`` per observation leaf, each checked to be exactly
        ``[width] + `` the leaf's shape and dtype."""
        out = []
        for path, arr in tree_leaves(self.cols["observation_full"]):
            field = "observations" + path_text(path)
            try:
                x = get(o, path, strict=True)
            except LookupError:
                x = None
            want = (self.width,) + arr.shape[2:]
            if x is None or is_tree(x) or not isinstance(x, np.ndarray) or (
                    x.shape != want or x.dtype != arr.dtype):
                got = (f"shape {x.shape} dtype {x.dtype}" if isinstance(x, np.ndarray)
                       else "no such entry" if x is None else f"a {type(x).__name__}")
                raise ValueError(
                    f"{self._name(v)} returned {field} with {got} at {when}; expected a numpy "
                    f"array of shape {want} dtype {arr.dtype}: [num_envs] + one sub-env's "
                    f"observation as on the first one (cast it in the env or a wrapper)")
            out.append((path, x))
        return out

    def _write_infos(self, t: int, v: int, info: Any, ended: np.ndarray | None) -> None:
        """The numeric ``[width]`` info entries the probe saw, into env_info[t]. In SameStep
        mode a sub-env that ended reports its step's info in ``infos["final_info"]`` (the
        top level holds its reset's): that is what single envs record at that step."""
        a, b = self.spans[v]
        if not isinstance(info, dict):
            raise TypeError(f"{self._name(v)} returned infos of type {type(info).__name__} "
                            f"at step {t}; a vector env's infos is a dict")
        final = None
        if ended is not None and self.modes[v] == "SameStep":
            final = info.get("final_info")
            if not isinstance(final, dict):
                raise ValueError(
                    f"{self._name(v)} ended episodes at step {t} but its infos have no "
                    f"'final_info' dict: in autoreset mode SameStep a vector env returns the "
                    f"ended sub-envs' step infos there (and their reset infos at the top "
                    f"level)")
        for path, arr, _ in self.info_leaves:
            want = (self.width,) + arr.shape[2:]
            x = self._info_entry(info, path, t, v, want, arr.dtype, "infos",
                                 missing_ok=final is not None and bool(ended.all()))
            if final is not None:
                f = self._info_entry(final, path, t, v, want, arr.dtype, "infos['final_info']")
                x = f if x is None else np.where(
                    ended.reshape((-1,) + (1,) * (len(want) - 1)), f, x)
            arr[t, a:b] = x

    def _info_entry(self, info: dict, path: tuple, t: int, v: int, want: tuple, dtype: Any,
                    where: str, missing_ok: bool = False) -> Any:
        """``info`` at ``path``, checked to be a ``want``-shaped array castable to ``dtype``
        exactly (None if missing and ``missing_ok``)."""
        key = "/".join(map(str, path))
        try:
            x = get(info, path, strict=True)
        except LookupError:
            if missing_ok:
                return None
            raise ValueError(
                f"{self._name(v)} returned no {where} {key!r} at step {t}; it had it on the "
                f"probe step, and a batch cannot tell a missing entry from 0. Report the "
                f"entry at every step") from None
        problem = (f"{type(x).__name__}, not a numpy array" if not isinstance(x, np.ndarray)
                   else f"shape {x.shape}, not {want}" if x.shape != want
                   else cast_problem(x, dtype))
        if problem:
            raise TypeError(f"{self._name(v)} returned {where} {key!r} at step {t}: {problem}; "
                            f"expected {dtype} of shape {want} as on the probe step")
        return x



def random_stepper(env: Any, seed: int, n_actions: int) -> Callable[[], None]:
    """For timing a vector env alone (``auto``'s probe, the benchmark): ``step()`` steps it
    once with random actions drawn beforehand (``n_actions`` rows, cycled), resetting ended
    sub-envs in Disabled mode as the sampler does. The env is reset (seeded) here."""
    width, mode = vector_width(env), autoreset_mode(env, "the env")
    seeded_reset(env, [seed + i for i in range(width)])
    space = env.single_action_space
    rows = random_action_fn(space, np.random.default_rng(seed))(n_actions * width)
    rows = rows.reshape((n_actions, width) + tuple(getattr(space, "shape", None) or ()))
    state = [0]

    def step() -> None:
        i = state[0]
        _, _, te, tr, _ = env.step(rows[i])
        state[0] = i + 1 if i + 1 < n_actions else 0
        if mode == "Disabled":
            done = te | tr
            if done.any():
                env.reset(options={"reset_mask": done})

    return step


def env_label(v: int, form: tuple, label: str = "env", first: int = 0) -> str:
    """How messages name env ``v`` of a ``(vector, width)`` form whose envs' global
    indices start at ``first``: "env 3", or for vector envs "envs 4..7 (vector env 1)"."""
    vector, width = form
    if not vector:
        return f"{label} {first + v}"
    a = first + v * width
    return f"{label}s {a}..{a + width - 1} (vector env {a // width})"


def collector(envs: list, lo: int, bufs: dict, vector: bool, width: int,
              **kw: Any) -> Collector:
    """The collector for ``envs``: a :class:`VectorCollector` if they are vector envs of
    ``width`` sub-envs, else a :class:`Collector`."""
    if vector:
        return VectorCollector(envs, lo, bufs, width=width, **kw)
    return Collector(envs, lo, bufs, **kw)
