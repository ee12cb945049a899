"""Vector envs: one env object that steps ``num_envs`` sub-envs in one call, filling as many
consecutive columns of the batch.

Imports collector, errors, spaces and tree. The sampler recognises a vector env by
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

from typing import Any, Callable, NamedTuple

import numpy as np

from .collector import (
    BEAT_ENV,
    DECORRELATE,
    Collector,
    Views,
    checked_leaf,
    checked_value,
    mark,
    stream_key,
)
from .errors import env_name, missing_entry, not_a_dict, tag, tagged
from .spaces import action_pool, random_action_fn
from .tree import get, is_tree, path_text, tree_leaves, tree_map

__all__ = ["Form", "is_vector", "vector_width", "env_form", "autoreset_mode", "seeded_reset",
           "check_vector_step", "vector_infos", "VectorCollector", "collector",
           "random_stepper"]

MODES = ("SameStep", "Disabled")  # the autoreset modes the sampler can honour
MAKE_WITH = ("make it with gymnasium.make_vec(..., vectorization_mode='sync', "
             "vector_kwargs={'autoreset_mode': gymnasium.vector.AutoresetMode.SAME_STEP}) "
             "(or DISABLED), or set its metadata['autoreset_mode'] to 'SameStep' or "
             "'Disabled' if it behaves that way")


class Form(NamedTuple):
    """What one env from an env_fn is: a vector env or not, and the batch columns it fills
    (``num_envs`` for a vector env, else 1)."""

    vector: bool = False
    width: int = 1


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


def env_form(env: Any, what: str) -> Form:
    """The :class:`Form` of ``env`` (a vector env must be one the sampler can honour: else
    an error naming ``what``)."""
    if is_vector(env):
        autoreset_mode(env, what)
    return Form(is_vector(env), vector_width(env))


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


def seeded_reset(env: Any, seeds: list | None) -> tuple:
    """``env.reset(seed=seeds)``: one seed per sub-env (None: an unseeded reset). A vector
    env whose reset takes one int only (e.g. gymnasium's vector entry points) gets
    ``seeds[0]`` and seeds its sub-envs from it as it defines."""
    if seeds is None:
        return env.reset()
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
    for field, x, kinds, kind in (("rewards", out[1], "iuf", "real numbers (int or float)"),
                                  ("terminated", out[2], "b", "bools"),
                                  ("truncated", out[3], "b", "bools")):
        if x.__class__ is not np.ndarray or x.shape != (width,) or x.dtype.kind not in kinds:
            got = (f"shape {x.shape} dtype {x.dtype}" if isinstance(x, np.ndarray)
                   else f"{type(x).__name__} {x!r:.60}")
            raise TypeError(f"{what} returned {field} {got} at {when}; a vector env returns "
                            f"{field} as a numpy array of {width} {kind}, one per sub-env "
                            f"(num_envs={width})")
    return out


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


class Block(NamedTuple):
    """One vector env's views of one step: its first column and its columns of action,
    reward, terminated, truncated, done and the next observation (None for trees)."""

    first: int
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    done: np.ndarray
    next_obs: np.ndarray | None


class VectorCollector(Collector):
    """A :class:`Collector` over vector envs of ``width`` sub-envs each: vector env ``v``
    fills columns ``lo + v * width`` to ``lo + (v + 1) * width - 1``, and sub-env ``i`` of it
    is the env of column ``lo + v * width + i`` for every purpose (seeds, episode stats,
    ``env_ids``, messages)."""

    def __init__(self, envs: list, lo: int, bufs: dict, *, width: int, **kw: Any):
        self.width = width
        self.spans = [(v * width, (v + 1) * width) for v in range(len(envs))]
        super().__init__(envs, lo, bufs, **kw)
        # Per vector env too: messages about a whole step name the vector env.
        self.vnames = [env_name(self.g + a, label=self.label, width=width, where=self.where)
                       for a, _ in self.spans]
        self.modes = [autoreset_mode(env, self.vnames[v]) for v, env in enumerate(envs)]
        for v, env in enumerate(envs):
            if vector_width(env) != width:
                raise ValueError(f"{self.vnames[v]} has num_envs={vector_width(env)}, but "
                                 f"the first env had {width}: every env from env_fn must "
                                 f"have the same num_envs")
        obs = self.cols["observation_full"]
        # Array observations (the usual case) are written with one type test and one copy.
        self.obs_form = None if is_tree(obs) else ((width,) + obs.shape[2:], obs.dtype)

    def name(self, v: int) -> str:
        """Vector env v's name alone (where an error happened: its header says who)."""
        return env_name(self.g + self.spans[v][0], label=self.label, width=self.width)

    def _bind(self, bufs: dict) -> Views:
        views = super()._bind(bufs)
        c = views.cols
        obs = c["observation_full"]
        views.blocks = [[Block(a, c["action"][t, a:b], c["reward"][t, a:b],
                               c["terminated"][t, a:b], c["truncated"][t, a:b],
                               c["done"][t, a:b], None if is_tree(obs) else obs[t + 1, a:b])
                         for a, b in self.spans] for t in range(self.batch_T)]
        return views

    # -- start -------------------------------------------------------------------------
    def _reset(self, v: int, row: int, what: str, seeds: list | None, after: str = "") -> None:
        """Reset vector env v (sub-env i seeded ``seeds[i]``, if given) into ``row``."""
        o, _ = tagged(seeded_reset, f"{what} of {self.name(v)}{after}", self.envs[v], seeds)
        self.write_block(row, v, o, what.replace("the", "its", 1))

    def _decorrelate(self, v: int, seed: int, max_steps: int) -> None:
        """Sub-envs of one vector env step together, so they take the same number of
        random steps, drawn from ``[seed, first column]``; each draws its own random
        actions. These steps are not in any episode's stats."""
        env, (a, b), T = self.envs[v], self.spans[v], self.batch_T
        rng = np.random.default_rng(stream_key(seed, self.g + a, 0xDEC0, self.restart_count))
        n_steps = int(rng.integers(0, max_steps + 1))
        random_action = random_action_fn(env.single_action_space, rng)
        prev_a = np.zeros_like(self.cols["prev_action_full"][T, a:b])
        prev_r = np.zeros(b - a, np.float32)
        for i in range(n_steps):
            when = f"decorrelation step {i}"
            mark(self.beat, DECORRELATE, i, a)
            acts = random_action(self.width)
            o, r, te, tr, info = check_vector_step(env.step(acts), self.width,
                                                   self.vnames[v], when)
            done = te | tr
            prev_a[...], prev_r[...] = acts, r
            prev_a[done], prev_r[done] = 0, 0
            self.write_block(T, v, o, when)
            if done.any() and self.modes[v] == "Disabled":
                self._reset_ended(T, v, done, when)
        self.cols["prev_action_full"][T, a:b] = prev_a
        self.cols["prev_reward_full"][T, a:b] = prev_r

    # -- one step ----------------------------------------------------------------------
    def step_envs(self, t: int) -> None:
        """Step every vector env with its columns of ``action[t]``; write rows t and t+1
        with one numpy assignment per field; per-episode work for ended sub-envs only."""
        self.ended.clear()
        width, names, beat, obs_form = self.width, self.vnames, self.beat, self.obs_form
        info_leaves = self.views.info_leaves
        v = 0
        try:
            for v, (env, block) in enumerate(zip(self.envs, self.views.blocks[t])):
                if beat is not None:
                    beat[BEAT_ENV] = block.first
                # a copy: an env may keep the actions it gets (the row is overwritten later)
                o, r, te, tr, info = check_vector_step(env.step(block.action.copy()), width,
                                                       names[v], t)
                if r.dtype.itemsize > 4:  # beyond float32: end_batch refuses the inf
                    with np.errstate(over="ignore"):
                        block.reward[...] = r
                else:
                    block.reward[...] = r
                block.terminated[...] = te
                block.truncated[...] = tr
                d = te | tr
                block.done[...] = d
                obs = block.next_obs
                if obs is not None and o.__class__ is np.ndarray and (
                        o.shape == obs_form[0] and o.dtype == obs_form[1]):
                    obs[...] = o
                else:
                    self.write_block(t + 1, v, o, f"step {t} of the batch")
                ended = np.count_nonzero(d)
                if info_leaves:
                    self._write_infos(t, v, info, d if ended else None)
                if ended:
                    self._ends(t, v, o, te, tr, d, info)
        except Exception as e:
            tag(e, f"{self.name(v)}, step {t} of the batch")
            raise
        self._finish_step(t, flags=False)  # this loop wrote terminated, truncated and done

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
                    f"{self.vnames[v]} ended the episodes of envs "
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
                               name="infos['final_obs']" if same_step else "observation",
                               when=f"step {t} of the batch")
            self.ended.append((j, f, te[i], tr[i]))
        if not same_step:
            tagged(self._reset_ended, f"the masked reset (reset(options={{'reset_mask': "
                   f"...}})) of {self.name(v)} after step {t} of the batch", t + 1, v, done,
                   f"the masked reset after step {t}")

    def _reset_ended(self, row: int, v: int, done: np.ndarray, when: str) -> None:
        """Disabled mode: reset the sub-envs in ``done``; write their new observations."""
        o, _ = self.envs[v].reset(options={"reset_mask": done})
        self.write_block(row, v, o, when, done)

    # -- writing blocks ----------------------------------------------------------------
    def write_block(self, row: int, v: int, o: Any, when: str, mask: Any = slice(None)) -> None:
        """Write vector env v's observations ``[width, ...]`` (the sub-envs in ``mask``) into
        ``row``, every leaf checked first to be exactly ``[width] + `` the leaf's shape and
        dtype."""
        a, b = self.spans[v]
        leaves = [(arr, checked_leaf(o, path, (self.width,) + arr.shape[2:], arr.dtype,
                                     self.vnames[v], "observations",
                                     "([num_envs] + one sub-env's observation, as on the "
                                     "first one)", when))
                  for path, arr in tree_leaves(self.cols["observation_full"])]
        for arr, src in leaves:
            arr[row, a:b][mask] = src[mask]

    def _write_infos(self, t: int, v: int, info: Any, ended: np.ndarray | None) -> None:
        """The numeric ``[width]`` info entries the probe saw, into env_info[t]. In SameStep
        mode a sub-env that ended reports its step's info in ``infos["final_info"]`` (the
        top level holds its reset's): that is what single envs record at that step."""
        a, b = self.spans[v]
        when = f"step {t} of the batch"
        if not isinstance(info, dict):
            raise TypeError(not_a_dict(self.vnames[v], "infos", info, when))
        final = None
        if ended is not None and self.modes[v] == "SameStep":
            final = info.get("final_info")
            if not isinstance(final, dict):
                raise ValueError(
                    f"{self.vnames[v]} ended episodes at step {t} but its infos have no "
                    f"'final_info' dict: in autoreset mode SameStep a vector env returns the "
                    f"ended sub-envs' step infos there (and their reset infos at the top "
                    f"level)")
        for path, arr, _ in self.views.info_leaves:
            want = (self.width,) + arr.shape[2:]
            x = self._info_entry(info, path, when, v, want, arr.dtype, "infos",
                                 missing_ok=final is not None and bool(ended.all()))
            if final is not None:
                f = self._info_entry(final, path, when, v, want, arr.dtype, "infos['final_info']")
                x = f if x is None else np.where(
                    ended.reshape((-1,) + (1,) * (len(want) - 1)), f, x)
            arr[t, a:b] = x

    def _info_entry(self, info: dict, path: tuple, when: str, v: int, want: tuple, dtype: Any,
                    field: str, missing_ok: bool = False) -> Any:
        """``info`` at ``path``, checked to be a ``want``-shaped array castable to ``dtype``
        exactly (None if missing and ``missing_ok``)."""
        field += path_text(path)
        try:
            x = get(info, path, strict=True)
        except LookupError:
            if missing_ok:
                return None
            raise ValueError(missing_entry(self.vnames[v], field, when)) from None
        return checked_value(x, want, dtype, self.vnames[v], field, when, "the probe step")


def random_stepper(env: Any, seed: int, n_actions: int) -> Callable[[], None]:
    """For timing an env alone (``auto``'s probe, the benchmark): ``step()`` steps it once
    with random actions drawn beforehand (``n_actions`` of them, cycled), resetting it (a
    vector env: its ended sub-envs in Disabled mode) as the sampler does. The env is reset
    (seeded) here."""
    form = env_form(env, "the env")
    if not form.vector:
        env.reset(seed=seed)
        actions, i = action_pool(env.action_space, n_actions, seed), -1

        def step() -> None:
            nonlocal i
            i = i + 1 if i + 1 < n_actions else 0
            _, _, te, tr, _ = env.step(actions[i])
            if te or tr:
                env.reset()
        return step
    width, mode = form.width, autoreset_mode(env, "the env")
    seeded_reset(env, [seed + i for i in range(width)])
    space = env.single_action_space
    rows = random_action_fn(space, np.random.default_rng(seed))(n_actions * width)
    rows = rows.reshape((n_actions, width) + tuple(getattr(space, "shape", None) or ()))
    i = -1

    def vector_step() -> None:
        nonlocal i
        i = i + 1 if i + 1 < n_actions else 0
        _, _, te, tr, _ = env.step(rows[i])
        if mode == "Disabled":
            done = te | tr
            if done.any():
                env.reset(options={"reset_mask": done})
    return vector_step


def collector(envs: list, lo: int, bufs: dict, form: Form, **kw: Any) -> Collector:
    """The collector for ``envs`` of ``form``: a :class:`VectorCollector` for vector envs,
    else a :class:`Collector`."""
    if form.vector:
        return VectorCollector(envs, lo, bufs, width=form.width, **kw)
    return Collector(envs, lo, bufs, **kw)
