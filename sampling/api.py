"""``make_sampler``: the front door. Validates every argument before a process starts.

Imports kinds, samplers, collector, agents, agent_state, errors, pool and vector (and
lazily :mod:`sampling.auto` for ``"auto"``, :mod:`sampling.vector_env` for
``make_vector_env``).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import multiprocessing as mp
import numbers
import os
import sys
import types
from typing import Any, Callable, Sequence

import numpy as np

from .agent_state import RngGuard, device_of
from .agents import check_agent
from .collector import TrajInfo, make_env
from .errors import close_all, needs_workers, warn
from .kinds import KINDS, usable_cpus, worker_count
from .pool import start_method_of, unpicklable
from .samplers import Options, Sampler
from .vector import env_form

__all__ = ["make_sampler", "make_vector_env", "env_spaces", "usable_cpus"]

RESET_MODES = ("mid_batch", "wait")


# The longest shutdown_timeout: a day is more than any env needs to close, and the waits
# it feeds must stay finite (inf, nan or 1e300 make them raise OverflowError mid-shutdown;
# poll() takes milliseconds in a C int, about 24.8 days at most).
MAX_SHUTDOWN_TIMEOUT_S = 24 * 3600.0


def _seconds(name: str, value: Any, none_ok: str = "") -> float:
    """``value`` as seconds; a TypeError for what is not a real number (bools included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds{none_ok}, got {value!r} "
                        f"({type(value).__name__})")
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return float("inf")


def _shutdown_timeout(value: Any) -> float:
    seconds = _seconds("shutdown_timeout", value)
    if not 0.0 <= seconds <= MAX_SHUTDOWN_TIMEOUT_S:  # False for nan too
        raise ValueError(f"shutdown_timeout must be a number >= 0 and <= "
                         f"{MAX_SHUTDOWN_TIMEOUT_S:.0f} (a day), got {value!r}")
    return seconds


def _step_timeout(value: Any) -> float | None:
    if value is None:
        return None
    seconds = _seconds("step_timeout", value, " or None")
    if not 0.0 < seconds <= MAX_SHUTDOWN_TIMEOUT_S:  # False for nan too
        raise ValueError(f"step_timeout must be a finite number of seconds > 0, got {value!r} "
                         f"(at most {MAX_SHUTDOWN_TIMEOUT_S:.0f}, a day; None: no deadline)")
    return seconds


def _bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy's too): flags are never guessed from other types."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def _int(name: str, value: Any, minimum: int, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def make_sampler(
    kind: str,
    env_fn: Callable[[], Any],
    agent: Any,
    *,
    batch_T: int,
    batch_B: int,
    n_workers: int | None = None,
    seed: int = 0,
    reset_mode: str = "mid_batch",
    max_decorrelation_steps: int = 0,
    bootstrap_value: bool = False,
    final_observation: bool = False,
    discount: float = 0.99,
    traj_info: Callable[..., TrajInfo] = TrajInfo,
    eval_env_fn: Callable[[], Any] | None = None,
    eval_n_envs: int = 0,
    eval_max_steps: int | None = None,
    eval_max_trajectories: int | None = None,
    start_method: str | None = None,
    torch_threads: int | None = 1,
    cpu_affinity: Sequence | None = None,
    shutdown_timeout: float = 5.0,
    step_timeout: float | None = None,
    policy_lag: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_restarts: int = 0,
) -> Sampler:
    """Make a sampler of ``kind`` that steps ``batch_B`` copies of ``env_fn()``.

    kind: ``"serial"``, ``"cpu"``, ``"gpu"``, ``"alternating"``,
      ``"no_overlap_alternating"``, or ``"auto"`` (probe and pick; see ``sampler.kind``).
    env_fn: zero-argument callable returning a gymnasium-API env (sent to workers with
      cloudpickle, so lambdas and closures work), or a vector env of ``num_envs``
      sub-envs filling as many columns (see :mod:`sampling.vector`).
    agent: a callable ``policy(observation) -> action`` or an rlpyt-style agent.
    batch_T, batch_B: time steps and envs per batch.
    n_workers: worker processes (default: ``min(batch_B, usable CPUs)``, even for the
      alternating kinds).
    seed: env with global index b (a vector env's sub-env too) is first reset with
      ``seed + b``.
    reset_mode: ``"mid_batch"`` (reset as soon as an episode ends) or ``"wait"``.
    max_decorrelation_steps: each env first takes a random number (0..this) of random
      steps, reproducibly under ``seed``.
    bootstrap_value: record ``agent.value`` of the observation after the last step.
    final_observation: record the observation that ended each episode.
    discount, traj_info: episode stats (``traj_info(discount=...)`` makes one per episode).
    eval_env_fn, eval_n_envs, eval_max_steps, eval_max_trajectories: evaluation.
    start_method: ``"fork"``, ``"spawn"``, ``"forkserver"`` or None (platform default).
    torch_threads: torch threads per worker when torch is loaded there (None: leave as is).
    cpu_affinity: per worker, a list of CPU ids to pin it to (``os.sched_setaffinity``).
    shutdown_timeout: seconds ``shutdown()`` waits for workers to close their envs and
        exit before stopping them (finite, at most ``MAX_SHUTDOWN_TIMEOUT_S``, a day).
    step_timeout: seconds an env's ``step``/``reset`` (and ``env_fn()``,
        ``ENV_FN_TIMEOUT_FACTOR`` times as long) may take in a worker before the parent
        raises WorkerError with the worker's stack and kills it (None: no deadline).
    policy_lag: 0, or 1 to collect the next batch while the caller trains on this one:
        each batch is collected with the agent's parameters as they were when the caller
        asked for the previous batch (exactly one update behind; see docs/policy-lag.md).
    rank, world_size: this sampler is rank ``rank`` of ``world_size`` copies of the
        training script (``sampling.distributed.launch()`` reads them from torchrun,
        Slurm or MPI). Env b is global env ``rank * batch_B + b`` (its seed, its
        ``env_ids``), eval envs come after every rank's training envs, so the ranks'
        batches side by side are those of one sampler with ``world_size * batch_B``
        envs (same seed, deterministic agent).
    max_restarts: how many worker failures (an exception, a death, a missed step
        deadline) the sampler survives in all by replacing the worker; 0: the first
        failure raises WorkerError. See ``batch.restarts`` and docs/failures.md for the rule.
    """
    given = dict(locals())
    _check_callables(kind, env_fn, agent, eval_env_fn)
    opts = _options(given)
    if opts.bootstrap_value and not callable(getattr(agent, "value", None)):
        raise TypeError("bootstrap_value=True needs an agent with a "
                        "value(observation, prev_action, prev_reward) method")
    reason = probed = None
    if kind == "auto":
        from .auto import choose_kind
        with RngGuard(agent):  # its agent calls consume none of the user's random streams
            kind, reason, probed = choose_kind(env_fn, agent, opts)
        _check_workers_for(kind, opts.step_timeout, opts.max_restarts,
                           f"'auto' picked {kind!r} ({reason}); ")
    device = device_of(agent) if KINDS[kind].driver == "worker_agents" else None
    if device is not None:
        raise ValueError(f"the {kind!r} kind runs a copy of the agent in every worker process, "
                         f"on the CPU, and this agent holds tensors or modules on {device}: "
                         f"use the 'gpu' or 'alternating' kind (this process runs the agent; "
                         f"to_torch(batch, {device!r}) moves batches there), or keep the model "
                         f"on the CPU")
    if KINDS[kind].workers and start_method_of(start_method) != "fork":
        _check_picklable(env_fn, agent, eval_env_fn, kind)
    sampler = Sampler(kind, env_fn, agent, opts, probed)
    if reason is not None:
        sampler.auto_reason = reason
    return sampler


def make_vector_env(
    env_fns: Sequence[Callable[[], Any]],
    *,
    n_workers: int | None = None,
    start_method: str | None = None,
    autoreset_mode: Any = "next_step",
    copy: bool = True,
    step_timeout: float | None = None,
    max_restarts: int = 0,
    shutdown_timeout: float = 5.0,
    torch_threads: int | None = 1,
    cpu_affinity: Sequence | None = None,
) -> Any:
    """The envs of ``env_fns`` (one zero-argument factory per env, as gymnasium's
    ``AsyncVectorEnv`` takes them) stepped in ``n_workers`` worker processes, behind
    gymnasium's ``VectorEnv`` API: ``reset(seed=, options=)``, ``step(actions)``,
    ``close()``. It returns what ``gymnasium.vector.SyncVectorEnv(env_fns, copy=copy,
    autoreset_mode=...)`` returns, faster (see :class:`sampling.vector_env.VectorEnv`).

    autoreset_mode: ``"next_step"`` (gymnasium's default) or ``"same_step"``
      (gymnasium's ``AutoresetMode`` values and names are accepted too).
    copy: return observations as copies (True) or as views valid until the next call.
    n_workers, start_method, step_timeout, max_restarts, shutdown_timeout, torch_threads,
    cpu_affinity: as for :func:`make_sampler` (``max_restarts``: the rule is in
    ``VectorEnv._recover``).
    """
    if callable(env_fns) or not isinstance(env_fns, collections.abc.Sequence) or not env_fns \
            or not all(callable(fn) for fn in env_fns):
        raise TypeError(f"env_fns must be a non-empty list of zero-argument env factories, one "
                        f"per env (e.g. [lambda: gymnasium.make('CartPole-v1')] * 8), got "
                        f"{env_fns!r:.80}")
    mode = getattr(autoreset_mode, "value", autoreset_mode)
    modes = {"next_step": "next_step", "same_step": "same_step", "NextStep": "next_step",
             "SameStep": "same_step"}
    if not isinstance(mode, str) or mode not in modes:
        raise ValueError(f"autoreset_mode must be 'next_step' or 'same_step' (or gymnasium's "
                         f"AutoresetMode.NEXT_STEP / SAME_STEP), got {autoreset_mode!r}")
    n = _int("n_workers", n_workers, 1, allow_none=True)
    opts = types.SimpleNamespace(
        n_workers=worker_count("gpu", len(env_fns), n), start_method=start_method,
        autoreset_mode=modes[mode], copy=_bool("copy", copy),
        step_timeout=_step_timeout(step_timeout),
        max_restarts=_int("max_restarts", max_restarts, 0),
        shutdown_timeout=_shutdown_timeout(shutdown_timeout),
        torch_threads=_int("torch_threads", torch_threads, 1, allow_none=True),
        cpu_affinity=None if cpu_affinity is None else _affinity(cpu_affinity))
    _check_start_method(start_method)
    if start_method_of(start_method) != "fork":
        for i, fn in enumerate(env_fns):
            _check_picklable(fn, None, None, None, name=f"env_fns[{i}]")
    from .vector_env import VectorEnv
    return VectorEnv(list(env_fns), opts)


def env_spaces(env_fn: Callable[[], Any]) -> tuple:
    """``(observation_space, action_space)`` of one env from ``env_fn`` (a vector env's
    single-env spaces), to size a network before the agent (and so the sampler) exists.
    The env is built and closed here; no env of a sampler is ever stepped by it."""
    if not callable(env_fn):
        raise TypeError(f"env_fn must be a zero-argument callable that returns an env, got "
                        f"{type(env_fn).__name__}")
    env = make_env(env_fn, "the env env_spaces() builds")
    try:
        if env_form(env, "the env env_spaces() builds").vector:
            return getattr(env, "single_observation_space", None), env.single_action_space
        return getattr(env, "observation_space", None), env.action_space
    finally:
        close_all([env])


def _check_callables(kind: str, env_fn: Any, agent: Any, eval_env_fn: Any) -> None:
    kinds = sorted(KINDS) + ["auto"]
    if kind not in kinds:
        raise ValueError(f"unknown sampler kind {kind!r}; valid kinds: {', '.join(kinds)}")
    if not callable(env_fn):
        raise TypeError(f"env_fn must be a zero-argument callable that returns an env, got "
                        f"{type(env_fn).__name__}; pass e.g. lambda: gymnasium.make('CartPole-v1')")
    if eval_env_fn is not None and not callable(eval_env_fn):
        raise TypeError(f"eval_env_fn must be a zero-argument callable or None, got "
                        f"{type(eval_env_fn).__name__}")
    check_agent(agent)


# The int options: (minimum, None allowed).
_INTS = {"batch_T": (1, False), "batch_B": (1, False), "n_workers": (1, True),
         "seed": (0, False), "max_decorrelation_steps": (0, False), "eval_n_envs": (0, False),
         "eval_max_steps": (1, True), "eval_max_trajectories": (1, True),
         "torch_threads": (1, True), "policy_lag": (0, False), "rank": (0, False),
         "world_size": (1, False), "max_restarts": (0, False)}


def _options(a: dict) -> Options:
    """make_sampler's arguments (``a``), checked, as :class:`Options`."""
    a = dict(a)
    for name, (minimum, allow_none) in _INTS.items():
        a[name] = _int(name, a[name], minimum, allow_none)
    if a["reset_mode"] not in RESET_MODES:
        raise ValueError(f"reset_mode must be one of {', '.join(map(repr, RESET_MODES))}, "
                         f"got {a['reset_mode']!r}")
    for name in ("bootstrap_value", "final_observation"):
        a[name] = _bool(name, a[name])
    discount = a["discount"]
    if isinstance(discount, bool) or not isinstance(discount, numbers.Real) or \
            not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be a number in [0, 1], got {discount!r}")
    a["discount"] = float(discount)
    _check_traj_info(a["traj_info"], a["discount"])
    E, max_steps = a["eval_n_envs"], a["eval_max_steps"]
    if E and max_steps is None and a["eval_max_trajectories"] is None:
        raise ValueError("eval_n_envs > 0 needs a stopping rule: set eval_max_steps and/or "
                         "eval_max_trajectories")
    if max_steps is not None and E and max_steps < E:
        raise ValueError(f"eval_max_steps ({max_steps}) counts steps over all eval envs "
                         f"and must be >= eval_n_envs ({E})")
    _check_start_method(a["start_method"])
    a["shutdown_timeout"] = _shutdown_timeout(a["shutdown_timeout"])
    a["step_timeout"] = _step_timeout(a["step_timeout"])
    if a["kind"] != "auto":  # (auto's pick is checked once it is made)
        _check_workers_for(a["kind"], a["step_timeout"], a["max_restarts"])
    if a["cpu_affinity"] is not None:
        a["cpu_affinity"] = _affinity(a["cpu_affinity"])
    if a["policy_lag"] > 1:
        raise ValueError(f"policy_lag must be 0 (collect each batch when asked) or 1 (collect "
                         f"the next batch while the caller trains on this one, with the "
                         f"parameters one update behind), got {a['policy_lag']!r}")
    _check_rank(a["rank"], a["world_size"])
    a["eval_env_fn"] = a["eval_env_fn"] or a["env_fn"]
    return Options(**{f.name: a[f.name] for f in dataclasses.fields(Options)})


def _check_workers_for(kind: str, step_timeout: Any, max_restarts: int,
                       picked: str = "") -> None:
    """step_timeout and max_restarts need worker processes: a kind without them is refused
    (before the options checked after this, as the first thing wrong with the call)."""
    for option, value, off in (("step_timeout", step_timeout, "step_timeout=None"),
                               ("max_restarts", max_restarts, "max_restarts=0")):
        if value and not KINDS[kind].workers:
            raise ValueError(picked + needs_workers(option, kind, off))


def _check_start_method(method: Any) -> None:
    methods = mp.get_all_start_methods()
    if method is not None and method not in methods:
        raise ValueError(f"start_method must be one of {', '.join(map(repr, methods))} or None, "
                         f"got {method!r}")


def _check_rank(rank: int, world_size: int) -> None:
    """``rank`` must be one of ``world_size`` ranks and, where torch.distributed has a
    process group, agree with it: a mismatch would give two ranks the same envs."""
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size): got rank={rank} with "
                         f"world_size={world_size}; pass the rank and world size your "
                         f"launcher gives (sampling.distributed.launch() reads them)")
    dist = sys.modules.get("torch.distributed")  # never imported here: no torch, no group
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    group_rank, group_size = dist.get_rank(), dist.get_world_size()
    if world_size == 1 and group_size > 1:
        warn(f"torch.distributed has a process group of {group_size} ranks, but this sampler "
             f"has world_size=1: ranks that pass the same seed sample the same episodes. "
             f"Pass rank=torch.distributed.get_rank(), "
             f"world_size=torch.distributed.get_world_size() (or a seed per rank, if "
             f"independent samplers are what you mean)")
    elif (rank, world_size) != (group_rank, group_size):
        raise ValueError(f"rank={rank}, world_size={world_size} disagree with torch.distributed's "
                         f"process group (rank {group_rank} of {group_size}); pass "
                         f"rank=torch.distributed.get_rank(), "
                         f"world_size=torch.distributed.get_world_size()")


TRAJ_INFO_METHODS = ("update(segment)", "terminate(final_observation)", "stats()")


def _check_traj_info(traj_info: Any, discount: float) -> None:
    """``traj_info(discount=...)`` must make a TrajInfo-like object: make one here, once
    (an episode's stats object is cheap), so that a mistake fails now and not in workers."""
    head = (f"traj_info must be a TrajInfo subclass (or a callable accepting discount= that "
            f"returns a TrajInfo-like object), got {traj_info!r}")
    fix = ("pass traj_info=sampling.TrajInfo, a subclass of it, or a factory such as "
           "functools.partial(MyTrajInfo, extra=1) that accepts discount= and returns an "
           "object with " + ", ".join(TRAJ_INFO_METHODS) + " methods")
    if isinstance(traj_info, TrajInfo):
        raise TypeError(f"{head}, an instance; pass the class itself: "
                        f"traj_info={type(traj_info).__name__}")
    if not callable(traj_info):
        raise TypeError(f"{head}; {fix}")
    try:
        made = traj_info(discount=discount)
    except Exception as e:
        raise TypeError(f"{head}: traj_info(discount={discount!r}) raised "
                        f"{type(e).__name__}: {e}; {fix}") from e
    missing = [m for m in TRAJ_INFO_METHODS if not callable(getattr(made, m.split("(")[0], None))]
    if missing:
        raise TypeError(f"{head}: traj_info(discount={discount!r}) returned {made!r:.80} "
                        f"({type(made).__name__}), which has no {', '.join(missing)} "
                        f"method{'s' if len(missing) > 1 else ''}; {fix}")


def _affinity(spec: Any) -> list:
    """Per worker, the sorted CPU ids to pin it to. Ids must be ints: int() would turn
    0.7, '1' and True into CPU ids without a word."""
    def bad(error: type, what: str) -> Exception:
        return error(f"cpu_affinity must be a list with one non-empty list of CPU ids (ints "
                     f">= 0) per worker, e.g. cpu_affinity=[[0], [1]] pins worker 0 to CPU 0 "
                     f"and worker 1 to CPU 1; {what}")

    def is_list(x: Any, sets: tuple = ()) -> bool:
        return not isinstance(x, (str, bytes, bytearray)) and isinstance(
            x, (collections.abc.Sequence,) + sets)

    spec = spec.tolist() if isinstance(spec, np.ndarray) else spec
    if not is_list(spec):
        raise bad(TypeError, f"got {spec!r} ({type(spec).__name__})")
    if not spec:
        raise bad(ValueError, f"got {spec!r}")
    out = []
    for w, cpus in enumerate(spec):
        cpus = cpus.tolist() if isinstance(cpus, np.ndarray) else cpus
        if not is_list(cpus, (collections.abc.Set,)):
            raise bad(TypeError, f"cpu_affinity[{w}] is {cpus!r} ({type(cpus).__name__}), "
                                 f"not a list of CPU ids")
        if not cpus:
            raise bad(ValueError, f"cpu_affinity[{w}] is {cpus!r}")
        ordered = isinstance(cpus, collections.abc.Sequence)  # else a set: no positions
        for i, c in enumerate(cpus):
            entry = f"cpu_affinity[{w}][{i}]" if ordered else f"an entry of cpu_affinity[{w}]"
            if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                raise bad(TypeError, f"{entry} is {c!r} ({type(c).__name__}), not an int")
            if c < 0:
                raise bad(ValueError, f"{entry} is {c}, not >= 0")
        out.append(sorted({int(c) for c in cpus}))
    if hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        bad_ids = sorted({c for cpus in out for c in cpus} - allowed)
        if bad_ids:
            raise ValueError(f"cpu_affinity names CPUs {bad_ids} that this process may not "
                             f"use; usable CPUs: {sorted(allowed)}")
    return out


def _check_picklable(env_fn, agent, eval_env_fn, kind: str | None,
                     name: str = "env_fn") -> None:
    """Everything that crosses to spawn/forkserver workers must pickle (``kind`` None:
    make_vector_env's workers)."""
    items = [(name, env_fn), ("eval_env_fn", eval_env_fn)]
    if kind is not None and not KINDS[kind].served:
        items.append(("agent", agent))
    who = f"the {kind!r} kind" if kind is not None else "make_vector_env"
    for name, obj in items:
        error = unpicklable(obj) if obj is not None else None
        if error is not None:
            raise TypeError(
                f"{name} cannot be pickled with cloudpickle ({type(error).__name__}: {error}); "
                f"{who} sends it to worker processes started with "
                f"spawn/forkserver. Build unpicklable things (locks, open files, sockets) "
                f"inside env_fn, or use start_method='fork'") from error
