"""What a batch holds: probe one env and one agent call, and lay out the batch's arrays.

Imports agents, agent_state, buffers, collector, errors, spaces, tree and vector. The probe
builds one separate env (never a training env), steps it once and calls the agent once, under
:class:`~sampling.agent_state.RngGuard`: the user's random streams come out as they went in.
"""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .agent_state import RngGuard
from .agents import AgentRunner
from .buffers import Spec, layout, size_text, spec_of
from .collector import check_reset, check_step, make_env
from .errors import close_all, describe
from .spaces import action_pool, random_action_fn
from .tree import path_text, to_numpy, tree_leaves, tree_map
from .vector import Form, check_vector_step, env_form, seeded_reset, vector_infos

__all__ = ["Probed", "probe", "batch_specs", "contents"]

INT64 = np.iinfo(np.int64)  # the range an int in env_info may take (its leaf is int64)
# Observation spaces whose values vary in size (gymnasium's, by class name: gymnasium is
# never imported); a batch has fixed shapes.
VARIABLE_SPACES = ("Sequence", "Graph", "Text")


@dataclass
class Probed:
    """What the probe env and one agent call tell about the batch layout."""

    observation: Any       # one env's observation (a tree of arrays)
    action_shape: tuple
    action_dtype: str
    env_info: dict         # the numeric entries of one step's info
    agent_info: dict       # one env's agent_info
    observation_space: Any
    action_space: Any
    form: Form = Form()    # what env_fn's envs are (see sampling.vector)
    own_processes: bool = False  # env_fn() started processes (a worker cannot)
    timing: Any = None     # what probe's ``timing`` returned


def probe(env_fn: Callable, runner: AgentRunner | None, seed: int, first_id: int = 0,
          bootstrap: bool = False, timing: Callable | None = None) -> Probed:
    """Build one separate env to learn the layout: observation, action, infos; call the
    agent once, if there is one (and its ``value`` with ``bootstrap``: what the options
    will call).

    Training envs are never stepped before their seeded reset; this env is thrown away
    (``timing(env, form)``, if given, may use it first, e.g. to time its steps). The agent's
    probe call names env ``first_id`` (this rank's first), so that an agent keeping
    per-env state sees only ids it will be given. Everything runs under
    :class:`RngGuard`: the user's random streams (global, and the agent's own generators)
    come out as they went in.
    """
    with RngGuard(runner.agent if runner is not None else None):
        return _probe_unguarded(env_fn, runner, seed, first_id, bootstrap, timing)


def _probe_unguarded(env_fn: Callable, runner: AgentRunner, seed: int, first_id: int,
                     bootstrap: bool, timing: Callable | None) -> Probed:
    what = "the probe env (the parent builds one to size buffers)"
    before = {p.pid for p in mp.active_children()}
    env = make_env(env_fn, what)
    try:
        own_processes = bool({p.pid for p in mp.active_children()} - before)
        form = env_form(env, what)
        width = form.width
        if form.vector:
            obs = check_reset(seeded_reset(env, [seed + i for i in range(width)]), what)
            space, obs_space = env.single_action_space, getattr(env, "single_observation_space",
                                                                None)
        else:
            obs = check_reset(env.reset(seed=seed), what)
            space, obs_space = env.action_space, getattr(env, "observation_space", None)
        _check_space(obs_space, what)
        shape, dtype = getattr(space, "shape", None), getattr(space, "dtype", None)
        if shape is None or dtype is None:
            raise TypeError(f"the env's action_space {space!r} has no shape/dtype; "
                            f"dict or tuple action spaces are not supported")
        if form.vector:
            a = random_action_fn(space, np.random.default_rng(seed))(width)
            out = check_vector_step(env.step(a), width, what, "the probe step")
            info = vector_infos(out[4], width, what)
        else:  # as the collector passes it: a Python int for scalar integer actions
            info = check_step(env.step(action_pool(space, 1, seed)[0]), what)[4]
        timed = timing(env, form) if timing is not None else None
    finally:
        close_all([env])
    if form.vector:
        for path, leaf in tree_leaves(obs):
            if not isinstance(leaf, np.ndarray):
                raise TypeError(f"{what}: a vector env returned observations{path_text(path)} "
                                f"as {type(leaf).__name__} from reset(); a vector env returns "
                                f"numpy arrays of [num_envs, ...]")
    obs = tree_map(np.asarray, obs)
    if form.vector:
        for path, leaf in tree_leaves(obs):
            if leaf.shape[:1] != (width,):
                raise ValueError(f"{what}: a vector env with num_envs={width} returned "
                                 f"observations{path_text(path)} of shape {leaf.shape} from "
                                 f"reset(); expected [num_envs, ...] arrays, one row per "
                                 f"sub-env")
        obs = tree_map(lambda x: x[0], obs)
    for path, leaf in tree_leaves(obs):
        if leaf.dtype.kind not in "biufc":
            raise TypeError(
                f"{what}: observation{path_text(path)} is {leaf.dtype} ({leaf!r:.80}); a batch "
                f"stores numbers: observations must be numeric arrays (dicts and tuples of "
                f"them are fine). Variable-size spaces ({', '.join(VARIABLE_SPACES)}) cannot "
                f"be batched: wrap the env to return fixed-size arrays")
    env_info = numeric(info, what)  # a vector env's share per sub-env: see vector_infos
    act_shape, act_dtype = tuple(shape), np.dtype(dtype).str
    if runner is None:
        return Probed(obs, act_shape, act_dtype, env_info, {}, obs_space, space, form,
                      own_processes, timed)
    args = (tree_map(lambda x: x[None], obs), np.zeros((1,) + act_shape, act_dtype),
            np.zeros(1, np.float32), np.arange(first_id, first_id + 1))
    action, agent_info = runner.step(*args)
    action = to_numpy(action)
    if action.shape != (1,) + act_shape:
        raise ValueError(f"the agent returned actions of shape {action.shape} for 1 env; "
                         f"expected {(1,) + act_shape} (one row per env, shaped like the action "
                         f"space {space!r})")
    agent_info = tree_map(_agent_info_row, agent_info) if agent_info else {}
    if bootstrap:
        runner.value(*args)  # bootstrap_value=True calls it at the end of every batch
    return Probed(obs, act_shape, act_dtype, env_info, agent_info, obs_space, space, form,
                  own_processes, timed)


def _check_space(space: Any, what: str, path: str = "observation_space") -> None:
    """Refuse observation spaces whose values vary in size, however deep in Dict/Tuple."""
    name = type(space).__name__
    if name in VARIABLE_SPACES and hasattr(space, "sample"):
        raise TypeError(f"{what}: {path} is a {name} space, whose observations vary in size; "
                        f"a batch holds fixed-size arrays: wrap the env to return fixed-size "
                        f"arrays (e.g. pad a Sequence to its longest length)")
    children = getattr(space, "spaces", None)
    items = children.items() if isinstance(children, dict) else enumerate(children or ())
    for k, sub in items:
        _check_space(sub, what, f"{path}[{k!r}]")


def _agent_info_row(x: Any) -> np.ndarray:
    """One env's row of an agent_info entry from the probe call, which must be numeric
    (arrays, or dicts of them, with one row per env)."""
    a = to_numpy(x)
    if a.dtype.kind not in "biufcUS" or a.ndim == 0:
        kind = f"a list of {type(x[0]).__name__}" if isinstance(x, list) and x else describe(a)
        raise TypeError(f"the agent's agent_info holds {kind}: its entries must be arrays "
                        f"with one row per env (or dicts of them, nested as deep as you "
                        f"like); lists of dicts and other objects are not supported")
    return a[0]


def numeric(info: Any, what: str, path: tuple = ()) -> dict:
    """The numeric entries of an info dict, as arrays (the env_info layout)."""
    if not isinstance(info, dict):
        raise TypeError(f"{what}: env.step returned info{path_text(path)} of type "
                        f"{type(info).__name__}; the gymnasium API's info is a dict "
                        f"(return {{}} if there is nothing to report)")
    out = {}
    for k, v in info.items():
        if isinstance(v, dict):
            sub = numeric(v, what, path + (k,))
            if sub:
                out[k] = sub
            continue
        if isinstance(v, int) and not INT64.min <= v <= INT64.max:
            raise OverflowError(f"{what}: env.step returned info{path_text(path + (k,))}={v}, "
                                f"beyond int64: a batch cannot store it. Report it as a "
                                f"float, or leave it out of info")
        try:
            a = np.asarray(v)
        except Exception:
            continue
        if a.dtype.kind in "biuf":
            out[k] = a
    return out


def batch_specs(T: int, B: int, p: Probed, final_obs: bool, bootstrap: bool) -> dict:
    def arr(rows, shape, dtype):
        return Spec((rows, B) + tuple(shape), dtype, True)  # env-major: see buffers.layout

    s = {
        "observation_full": spec_of(p.observation, (T + 1, B), env_major=True),
        "prev_action_full": arr(T + 1, p.action_shape, p.action_dtype),
        "prev_reward_full": arr(T + 1, (), "<f4"),
        "action": arr(T, p.action_shape, p.action_dtype),
        "agent_info": spec_of(p.agent_info, (T, B), env_major=True),
        "reward": arr(T, (), "<f4"),
        "terminated": arr(T, (), "|b1"),
        "truncated": arr(T, (), "|b1"),
        "done": arr(T, (), "|b1"),
        "env_info": spec_of(p.env_info, (T, B), env_major=True),
    }
    if final_obs:
        s["final_observation"] = spec_of(p.observation, (T, B), env_major=True)
    if bootstrap:
        s["bootstrap_value"] = Spec((B,), "<f4")
    return s


def contents(specs: dict, T: int, B: int, E: int) -> str:
    """What a sampler's memory holds, part by part, for allocation errors."""
    names = {"main": f"the batch [batch_T={T}, batch_B={B}]",
             "eval": f"the eval buffers [eval_n_envs={E}]",
             "params": "the agent's parameters (copied to the cpu workers)"}
    parts = [f"{text}: {size_text(layout({key: specs[key]})[0])}"
             for key, text in names.items() if key in specs]
    return ", ".join(parts)
