"""The worker pool as a gymnasium ``VectorEnv`` (:func:`sampling.make_vector_env`), for
scripts that call ``envs.step(actions)`` themselves.

Imports agents, buffers, collector, errors, kinds, pool, probe, tree and worker, and
gymnasium if it is installed (then :class:`VectorEnv` is a ``gymnasium.vector.VectorEnv``,
and its wrappers accept it): ``import sampling`` does not import this module, only
:func:`sampling.make_vector_env` does.

The script is the action server: ``step`` writes the actions into one shared segment and
hands every worker its step (the served kinds' handoff: no pickling per step); a worker
steps its envs as gymnasium's ``SyncVectorEnv`` does, in NEXT_STEP or SAME_STEP autoreset,
and writes observations, rewards and flags back. Infos cross the pipe, and only from a
worker whose envs returned a non-empty one (or ended an episode under SAME_STEP).
Observations alternate between two sets of buffers, so the last step's are still there
when a worker fails (see :meth:`VectorEnv._recover`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .agents import write_checked
from .buffers import SharedBuffer, Spec, layout, spec_of, views
from .collector import (
    BEAT_ENV,
    IDLE,
    MAKE,
    RESET,
    REWARD_TYPES,
    STEP,
    WAIT,
    check_flag,
    check_reward,
    checked_leaf,
    env_seed,
    make_env,
    mark,
)
from .errors import SamplerClosedError, env_name, locate, not_a_dict, tag
from .kinds import split
from .pool import BEAT_WORDS, Done, PoolSpec, Ready, Resources, acquire
from .probe import probe
from .tree import tree_leaves, tree_map
from .worker import deadline, limit_threads, pin, stuck_text

try:  # the gymnasium VectorEnv API, where gymnasium is installed
    from gymnasium.vector import AutoresetMode as _AutoresetMode
    from gymnasium.vector import VectorEnv as _Base
    from gymnasium.vector.utils import batch_space as _batch_space
except ImportError:  # pragma: no cover - exercised where gymnasium is absent
    _Base, _AutoresetMode, _batch_space = object, None, None

__all__ = ["VectorEnv", "AUTORESET_MODES"]

# The autoreset modes offered, by gymnasium's AutoresetMode values (names also accepted).
AUTORESET_MODES = {"NextStep": "next_step", "SameStep": "same_step"}
# What the parent asks a worker for, in its ctrl word.
STEP_CMD, RESET_CMD, OPTIONS_CMD, STOP_CMD = range(4)


@dataclass
class StepperConfig:
    """What one worker of a vector env needs (sent once, at its start)."""

    index: int
    env_fns: list            # its envs' factories
    lo: int                  # the index of its first env
    same_step: bool          # SAME_STEP autoreset (else NEXT_STEP)
    torch_threads: int | None
    cpu_affinity: list | None
    restart: int = 0         # a replacement resets its envs with env_seed(seed, b, restart)
    seed: int = 0


def run(link: Any, arrays: dict, cfg: StepperConfig) -> None:
    """The worker program: build the envs, say Ready, then serve steps and resets until
    STOP (or the pool's Close)."""
    limit_threads(cfg.torch_threads)
    pin(cfg.cpu_affinity)
    for j, fn in enumerate(cfg.env_fns):
        mark(link.beat, MAKE, 0, j)
        link.envs.append(make_env(fn, env_name(cfg.lo + j), f"env_fns[{cfg.lo + j}]"))
    limit_threads(cfg.torch_threads)  # an env_fn may have imported torch
    stepper = _Stepper(link, arrays, cfg)
    link.send(Ready())
    while stepper.serve():
        pass


class _Stepper:
    """A worker's envs, stepped as gymnasium's SyncVectorEnv steps them."""

    def __init__(self, link: Any, arrays: dict, cfg: StepperConfig):
        self.link, self.cfg, self.envs = link, cfg, list(link.envs)
        lo, n = cfg.lo, len(link.envs)
        self.cols = slice(lo, lo + n)
        self.arrays, self.ctrl = arrays, arrays["ctrl"][cfg.index]
        self.names = [env_name(lo + j) for j in range(n)]
        obs = arrays["obs"]
        # Per observation set, per env: a memoryview of its row (1-D array observations;
        # see collector.Views.obs_rows), else None (the checked path writes it).
        self.rows = [[memoryview(r) for r in obs[s, self.cols]] if getattr(obs, "ndim", 0) == 3
                     else None for s in (0, 1)]
        # NEXT_STEP: envs whose episode ended; their next step is a reset. A replacement
        # starts with all of them so, seeded afresh (see VectorEnv._recover), unless the
        # parent resets it at once.
        self.pending = [cfg.restart > 0] * n
        self.discrete = arrays["action"].ndim == 1 and arrays["action"].dtype.kind in "iub"
        # Its rewards and flags as memoryviews: a store per env costs less than a list
        # turned into an array per step.
        self.results = [memoryview(arrays[k][self.cols])
                        for k in ("reward", "terminated", "truncated")]

    def serve(self) -> bool:
        link = self.link
        mark(link.beat, WAIT)
        acquire(link.act_ready, link.check_parent)
        code, s = self.ctrl[:2].tolist()
        if code == STOP_CMD:
            return False
        options = link.recv() if code == OPTIONS_CMD else None
        infos = self.step(s) if code == STEP_CMD else self.reset(s, options)
        self.arrays["has_infos"][self.cfg.index] = bool(infos)
        if infos:
            link.send(Done(infos))
        mark(link.beat, IDLE)
        link.obs_ready.release()
        return True

    def reset(self, s: int, options: Any) -> list:
        """Reset every env (seeded where the parent wrote a seed); the reset infos."""
        seeds, seeded = self.arrays["seed"][self.cols], self.arrays["seeded"][self.cols]
        infos = []
        for j, env in enumerate(self.envs):
            mark(self.link.beat, RESET, 0, j)
            o, info = env.reset(seed=int(seeds[j]) if seeded[j] else None, options=options)
            self._write(s, j, o, "its reset")
            if self._info(j, info, "its reset"):
                infos.append((j, info, None))
        self.pending = [False] * len(self.envs)
        self.cfg.restart = 0
        return infos

    def step(self, s: int) -> list:
        """Step every env with its action (NEXT_STEP: reset those whose episode ended at the
        last step instead); write the results into observation set ``s``; the infos.

        The usual path per env: the step, type tests of the reward and the flags, a
        memoryview copy of the observation and a test of the info; episode ends and autoreset
        steps take branches, wrong types and non-array observations the checked paths."""
        arrays, cols, beat, rows = self.arrays, self.cols, self.link.beat, self.rows[s]
        acts = arrays["action"][cols]
        acts = acts.tolist() if self.discrete else list(acts.copy())
        pending, real, infos = self.pending, REWARD_TYPES, []
        rewards, terms, truncs = self.results
        mark(beat, STEP, 0, 0)
        j, when = 0, "its step"
        try:
            for j, env in enumerate(self.envs):
                if beat is not None:
                    beat[BEAT_ENV] = j
                if pending[j]:  # its episode ended at the last step: this step resets it
                    when = "the reset of its autoreset"
                    pending[j] = False
                    restart = self.cfg.restart  # a replacement's: seeded afresh (see _recover)
                    o, info = env.reset(seed=env_seed(self.cfg.seed, self.cfg.lo + j, restart)
                                        if restart else None)
                    rewards[j], terms[j], truncs[j] = 0.0, False, False
                else:
                    o, r, te, tr, info = env.step(acts[j])
                    if r.__class__ not in real:
                        r = check_reward(r, self.names[j], when)
                    try:
                        rewards[j] = r
                    except ValueError:  # an int beyond float64, in memoryview's cryptic words:
                        rewards[j] = float(r)  # Python's OverflowError, as SyncVectorEnv's
                    if (te is not False and te is not True) or (tr is not False
                                                                and tr is not True):
                        te, tr = (check_flag(te, "terminated", self.names[j], when),
                                  check_flag(tr, "truncated", self.names[j], when))
                    terms[j], truncs[j] = te, tr
                    if te or tr:  # SAME_STEP resets it now, NEXT_STEP at the next step
                        when = "the reset of its autoreset"
                        if not self.cfg.same_step:
                            pending[j] = True
                        else:
                            infos.append((j, None, (o, self._info(j, info, "its step"))))
                            o, info = env.reset()
                try:
                    rows[j][:] = o
                except (TypeError, ValueError):  # not a 1-D array of this shape and dtype
                    self._write(s, j, o, when)
                if info.__class__ is not dict:
                    info = self._info(j, info, when)
                if info:
                    infos.append((j, info, None))
                when = "its step"
        except Exception as e:
            tag(e, f"{self.names[j]}, {when}")
            raise
        self.cfg.restart = 0  # its first resets are done
        return infos

    def _write(self, s: int, j: int, o: Any, when: str) -> None:
        """Env j's observation into set ``s``, leaf by leaf, checked."""
        for path, arr in tree_leaves(self.arrays["obs"]):
            arr[s, self.cols.start + j] = checked_leaf(
                o, path, arr.shape[2:], arr.dtype, self.names[j], "observation",
                "as on its first observation", when)

    def _info(self, j: int, info: Any, when: str) -> dict:
        """``info``, checked to be a dict."""
        if not isinstance(info, dict):
            raise TypeError(not_a_dict(self.names[j], "info", info, when))
        return info


class VectorEnv(_Base):
    """``num_envs`` envs stepped in worker processes, with gymnasium's VectorEnv API.

    Made by :func:`sampling.make_vector_env`. ``reset(seed=, options=)`` and
    ``step(actions)`` return what ``gymnasium.vector.SyncVectorEnv`` returns for the same
    envs, seeds and actions; ``close()`` (also on exit, on garbage collection and on any
    error) stops the workers and frees the shared memory. Attributes: ``num_envs``,
    ``n_workers``, ``single_observation_space``, ``single_action_space``,
    ``observation_space``, ``action_space`` (batched with gymnasium's ``batch_space`` where
    it is installed, else None), ``metadata`` (``"autoreset_mode"``), ``render_mode``,
    ``restarts``.
    """

    def __init__(self, env_fns: list, opts: Any):
        self.num_envs, self.copy, self._opts = len(env_fns), opts.copy, opts
        self.closed, self._closed_reason, self.restarts = False, None, []
        self._same_step = opts.autoreset_mode == "same_step"
        self._res = Resources()
        self._finalizer = self._res.track(self)
        try:
            self._setup(env_fns, opts)
        except BaseException as e:
            locate(e)
            self._close(graceful=False, reason="its construction failed")
            raise

    def _setup(self, env_fns: list, o: Any) -> None:
        n = self.num_envs
        p = probe(env_fns[0], None, 0)
        if p.form.vector:
            raise TypeError("env_fns[0]() returned a vector env: make_vector_env steps single "
                            "envs (pass one env_fn per env, or the vector env to make_sampler)")
        self.single_observation_space, self.single_action_space = (p.observation_space,
                                                                   p.action_space)
        self.observation_space = self.action_space = None
        if _batch_space is not None:
            try:
                self.observation_space = _batch_space(p.observation_space, n)
                self.action_space = _batch_space(p.action_space, n)
            except Exception:  # spaces that are not gymnasium's: unbatched, as documented
                pass
        mode = "SameStep" if self._same_step else "NextStep"
        self.metadata = {"autoreset_mode": _AutoresetMode(mode) if _AutoresetMode else mode}
        self.render_mode = None
        self._bounds = _action_bounds(p.action_space)
        W = self.n_workers = o.n_workers
        self._slices = split(n, W)
        specs = {"obs": spec_of(p.observation, (2, n)),
                 "action": Spec((n,) + p.action_shape, p.action_dtype),
                 "reward": Spec((n,), "<f8"), "terminated": Spec((n,), "|b1"),
                 "truncated": Spec((n,), "|b1"), "seed": Spec((n,), "<i8"),
                 "seeded": Spec((n,), "|b1"), "ctrl": Spec((W, 2), "<i8"),
                 "has_infos": Spec((W,), "|b1")}
        if o.step_timeout is not None or o.max_restarts:
            specs["beats"] = Spec((W, BEAT_WORDS), "<i8")
        nbytes, placed = layout(specs)
        shared = self._res.shared = SharedBuffer(nbytes, what=f"the vector env of {n} envs",
                                                 keep_fd=o.max_restarts > 0)
        self._arrays = views(shared.buf, placed)
        # The observation set last written; the base of a replacement's seeds (a box the
        # pool's renew reads: the pool holds no reference to this object).
        self._set, self._seed_box = 0, [0]
        configs = [StepperConfig(w, env_fns[lo:hi], lo, self._same_step, o.torch_threads,
                                 o.cpu_affinity[w % len(o.cpu_affinity)] if o.cpu_affinity
                                 else None) for w, (lo, hi) in enumerate(self._slices)]
        self._res.pool.start(PoolSpec(
            program=run, configs=configs, shared=shared, placed=placed,
            labels=[f"vector env: worker {w} (envs {lo}..{hi - 1})"
                    for w, (lo, hi) in enumerate(self._slices)],
            envs=[list(range(lo, hi)) for lo, hi in self._slices],
            start_method=o.start_method, name=f"{__package__}-vector-env",
            beats=self._arrays.get("beats"),
            deadline=functools.partial(deadline, o.step_timeout),
            stuck=functools.partial(stuck_text, o.step_timeout, self._slices, self._slices,
                                    p.form, p.form),
            close_timeout=o.shutdown_timeout, max_restarts=o.max_restarts,
            renew=functools.partial(_renew, configs, self._seed_box)))
        shared.unlink()  # every worker has mapped it (see Sampler._start_pool)
        self.restarts += self._res.pool.take_failures()  # replaced while starting

    # -- the gymnasium API ---------------------------------------------------------------
    def reset(self, *, seed: int | list | None = None, options: dict | None = None) -> tuple:
        """Reset every env: ``seed`` None (unseeded), an int (env i gets ``seed + i``, as
        gymnasium does) or one int-or-None per env; ``options`` go to every env's reset.
        Returns ``(observations, infos)``."""
        self._check_open()
        seeds = _seeds(seed, self.num_envs)
        if options is not None and "reset_mask" in options:
            raise ValueError("reset(options={'reset_mask': ...}) is gymnasium's DISABLED "
                             "autoreset, which make_vector_env does not offer: use "
                             "autoreset_mode='next_step' or 'same_step'")
        self._arrays["seed"][:] = [0 if s is None else s for s in seeds]
        self._arrays["seeded"][:] = [s is not None for s in seeds]
        self._seed_box[0] = seeds[0] if seeds[0] is not None else 0
        infos = self._infos(self._round(RESET_CMD, options))
        return self._observations(), infos

    def step(self, actions: Any) -> tuple:
        """Step every env with its row of ``actions``; returns ``(observations, rewards,
        terminations, truncations, infos)`` as gymnasium does (rewards float64)."""
        self._check_open()
        _checked_actions(actions, self._arrays["action"], self._bounds)
        infos = self._infos(self._round(STEP_CMD))
        a = self._arrays
        return (self._observations(), a["reward"].copy(), a["terminated"].copy(),
                a["truncated"].copy(), infos)

    def close(self, **kwargs: Any) -> None:
        """Stop the workers (their envs are closed) and free the shared memory; idempotent."""
        self._close(graceful=True, reason="closed")

    close_extras = close

    def __enter__(self) -> VectorEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close(graceful=exc[0] is None, reason="closed")

    def __repr__(self) -> str:
        return (f"<{__package__} VectorEnv num_envs={self.num_envs} n_workers={self.n_workers}"
                f" {self.metadata['autoreset_mode']}{' closed' if self.closed else ''}>")

    # -- one round of the handoff --------------------------------------------------------
    def _round(self, code: int, options: Any = None) -> dict:
        """Hand every worker a command and the next observation set; wait for them; replace
        those that failed (``max_restarts``). ``{worker: its info entries}``."""
        self._set = 1 - self._set
        try:
            replies = self._hand(code, range(self.n_workers), options)
            replies.update(self._recover(code == STEP_CMD))
        except BaseException as e:
            locate(e)
            self._close(graceful=False, reason=f"{type(e).__name__} during "
                                               f"{'step' if code == STEP_CMD else 'reset'}")
            raise
        return replies

    def _hand(self, code: int, workers: Any, options: Any = None) -> dict:
        pool, a = self._res.pool, self._arrays
        if pool.out:
            workers = [w for w in workers if w not in pool.out]
        if options is not None:
            pool.send(options)
        rows = slice(None) if len(workers) == self.n_workers else list(workers)
        a["ctrl"][rows] = (code + (options is not None), self._set)
        pool.release(workers)
        pool.wait_obs(workers)
        sent = a["has_infos"].tolist()
        return pool.gather([w for w in workers if sent[w]]) if any(sent) else {}

    def _recover(self, stepping: bool) -> dict:
        """Replace the workers that failed; the rule for their envs, in the step where it
        failed: each episode ends truncated at the last observation returned (reward 0, no
        infos from that step); the new episode starts from a reset seeded
        ``env_seed(seed, env, restart)``, whose observation comes as an autoreset's: in
        SAME_STEP at once (the last observation is ``final_obs``), in NEXT_STEP at the next
        step. A failure in ``reset()`` returns the replacement's reset."""
        pool, a, s = self._res.pool, self._arrays, self._set
        failures = pool.take_failures()
        failed = sorted(f.worker for f in failures)
        if not failed:
            return {}
        self.restarts += failures
        for w in failed:
            lo, hi = self._slices[w]
            a["reward"][lo:hi], a["terminated"][lo:hi], a["truncated"][lo:hi] = 0, False, True
            a["seed"][lo:hi] = [env_seed(self._seed_box[0], b, pool.restarts[w])
                                for b in range(lo, hi)]
            a["seeded"][lo:hi] = True
            for _, obs in tree_leaves(a["obs"]):
                obs[s, lo:hi] = obs[1 - s, lo:hi]  # the last observation returned
        pool.replace_out()
        if stepping and not self._same_step:
            return {w: [] for w in failed}  # the replacement resets at its first step
        finals = {w: [(j, None, (tree_map(lambda x, b=b: x[s, b].copy(), a["obs"]), {}))
                      for j, b in enumerate(range(*self._slices[w]))] if stepping else []
                  for w in failed}
        replies = self._hand(RESET_CMD, failed)
        if not stepping:
            a["truncated"][:] = False
        return {w: finals[w] + replies.get(w, []) for w in failed}

    def _infos(self, replies: dict) -> dict:
        """gymnasium's info batching: per key, an array over envs (its type from the first
        value: a number's dtype, an array's shape, else objects) and its ``_key`` mask;
        nested dicts alike; SAME_STEP's ``final_obs`` (objects) and ``final_info``."""
        infos: dict = {}
        for w, entries in replies.items():
            lo = self._slices[w][0]
            for j, info, final in entries:
                if final is not None:
                    _add_info(infos, {"final_obs": final[0], "final_info": final[1]}, lo + j,
                              self.num_envs)
                if info:
                    _add_info(infos, info, lo + j, self.num_envs)
        return infos

    def _observations(self) -> Any:
        obs, s = self._arrays["obs"], self._set
        if obs.__class__ is np.ndarray:  # the usual case: one array
            return obs[s].copy() if self.copy else obs[s]
        obs = tree_map(lambda a: a[s], obs)
        return tree_map(np.copy, obs) if self.copy else obs

    def _check_open(self) -> None:
        if self._closed_reason is not None:
            raise SamplerClosedError(f"the vector env is closed ({self._closed_reason}); "
                                     f"make a new one with make_vector_env")

    def _close(self, graceful: bool, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        pool = self._res.pool
        if graceful and pool.size and not pool.out:
            self._arrays["ctrl"][:, 0] = STOP_CMD  # workers waiting for a step exit at once
            pool.release(range(pool.size))
        try:
            self._res.close(graceful)
        finally:
            self._finalizer.detach()
            self.closed = True


def _add_info(infos: dict, info: dict, i: int, n: int) -> dict:
    """Add env i's ``info`` to ``infos`` as gymnasium's ``VectorEnv._add_info`` does."""
    for key, value in info.items():
        if isinstance(value, dict) and key != "final_obs":
            array = _add_info(infos.get(key, {}), value, i, n)
        else:
            array = infos.get(key)
            if array is None:
                if key == "final_obs":  # objects, whatever the observations are
                    array = np.full(n, None, dtype=object)
                elif type(value) in (int, float, bool) or isinstance(value, np.number):
                    array = np.zeros(n, dtype=type(value))
                elif isinstance(value, np.ndarray):
                    array = np.zeros((n,) + value.shape, dtype=value.dtype)
                else:
                    array = np.full(n, None, dtype=object)
            array[i] = value
        mask = infos.get(f"_{key}")
        if mask is None:
            mask = np.zeros(n, dtype=bool)
        mask[i] = True
        infos[key], infos[f"_{key}"] = array, mask
    return infos


def _renew(configs: list, seed_box: list, w: int, restart: int) -> StepperConfig:
    """Worker w's config for its ``restart``-th replacement (its seeds' base: the last
    reset's)."""
    return replace(configs[w], restart=restart, seed=seed_box[0])


def _seeds(seed: Any, n: int) -> list:
    """gymnasium's reset seeds: None, an int (env i gets seed + i), or n ints or Nones."""
    if seed is None:
        return [None] * n
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return [int(seed) + i for i in range(n)]
    if isinstance(seed, (list, tuple)) and len(seed) == n and all(
            s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, bool))
            for s in seed):
        return [None if s is None else int(s) for s in seed]
    raise TypeError(f"reset(seed=...) takes None, an int (env i is seeded seed + i) or a list "
                    f"of {n} ints or Nones, one per env; got {seed!r:.80}")


def _checked_actions(actions: Any, dst: np.ndarray, bounds: tuple | None) -> None:
    """Write ``actions`` into ``dst``, refused before any worker steps: another shape, a
    cast that changes values, or an integer outside ``bounds`` (``_action_bounds``)."""
    a = actions
    if a.__class__ is not np.ndarray or a.shape != dst.shape or a.dtype != dst.dtype:
        a = np.empty_like(dst)
        write_checked(a, actions, f"step(actions) for {len(dst)} envs", "got")
    if bounds is not None:
        low, high, space = bounds
        # The usual case, integers from 0 (Discrete): as uint64 a negative one is huge, so
        # one comparison tests both bounds (two reductions cost ~2 us more a step).
        if low.__class__ is int and low == 0 and a.dtype.kind in "iu":
            outside = np.count_nonzero(a.astype(np.uint64) >= high)
        else:
            scalar = low.__class__ is int and high.__class__ is int
            outside = not scalar or a.min(initial=low) < low or a.max(initial=low) >= high
        if outside:
            bad = (a < low) | (a >= high)
            if bad.any():
                i = int(np.argwhere(bad)[0][0])
                raise ValueError(f"step(actions): env {i}'s action {a[i].tolist()} is "
                                 f"outside its action space {space!r}")
    dst[...] = a


def _action_bounds(space: Any) -> tuple | None:
    """``(low, high, space)``: the integers of a Discrete, MultiDiscrete or MultiBinary space
    lie in [low, high) (Python ints, or arrays per entry); None for a Box, whose bounds are
    the env's business, as in gymnasium."""
    if not (hasattr(space, "nvec") or hasattr(space, "n")):
        return None
    low = np.asarray(getattr(space, "start", 0))
    high = low + (np.asarray(space.nvec) if hasattr(space, "nvec")
                  else 2 if getattr(space, "shape", ()) else space.n)
    if low.ndim or high.ndim:
        return low, high, space
    return low.item(), high.item(), space
