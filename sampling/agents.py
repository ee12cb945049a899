"""The agent protocol: wrap a plain policy or an rlpyt-style agent, and run it on a batch slice.

Imports numpy, :mod:`sampling.buffers`, :mod:`sampling.spaces` and :mod:`sampling.tree`.
Every kind calls the agent through :class:`AgentRunner`, so "who calls the agent" (parent
or worker) is the only thing a kind decides.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from .buffers import cast_problem
from .errors import missing_entry, not_a_dict
from .spaces import random_action_fn
from .tree import get, path_text, to_numpy, tree_leaves, tree_map

__all__ = ["RandomAgent", "AgentRunner", "check_agent", "write_checked"]

# RandomAgent draws this many actions ahead (a few steps of a large batch): cheap to hold,
# and one generator call per POOL_STEPS actions instead of one per step.
POOL_STEPS = 4096


class RandomAgent:
    """Uniformly random actions from ``action_space``; ignores observations.

    Vectorized (one draw per call for all envs), so it measures the sampler, not itself.
    Draws come from ``self.rng`` (``np.random.default_rng(seed)``); in ``cpu``-kind workers
    the sampler reseeds it per worker, like every generator an agent holds.
    """

    def __init__(self, action_space: Any, seed: int | None = 0):
        self.action_space = action_space
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._sample = random_action_fn(action_space, self.rng)
        self._pool, self._used = None, 0

    def reset(self) -> None:
        """Drop the draws made ahead, so the next step draws from ``rng`` as it is now."""
        self._pool, self._used = None, 0

    def step(self, observation, prev_action=None, prev_reward=None, env_ids=None):
        n = len(prev_reward) if prev_reward is not None else len(next(iter(
            dict(tree_leaves(observation)).values())))
        # Draw many steps' worth at once: one generator call per step would cost more than
        # the sampler's own per-step work, and this agent exists to measure the sampler.
        if self._pool is None or self._used + n > len(self._pool):
            self._pool, self._used = self._sample(max(POOL_STEPS, n)), 0
        self._used += n
        return self._pool[self._used - n:self._used], None

    def shared_arrays(self) -> dict:
        """No parameters: nothing for the ``cpu`` kind to copy into workers."""
        return {}

    def __getstate__(self):
        return {"action_space": self.action_space, "seed": self.seed,
                "rng": self.rng.bit_generator.state}

    def __setstate__(self, state):
        self.__init__(state["action_space"], state["seed"])
        self.rng.bit_generator.state = state["rng"]


def _accepts_env_ids(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "env_ids" or p.kind is p.VAR_KEYWORD for p in params)


def check_agent(agent: Any) -> bool:
    """Whether ``agent`` follows the protocol (has ``step``); a TypeError unless it is that
    or a plain callable policy."""
    if callable(getattr(agent, "step", None)):
        return True
    if not callable(agent):
        raise TypeError(f"agent must be a callable policy(observation) -> action or an object "
                        f"with a step(observation, prev_action, prev_reward) method; got "
                        f"{type(agent).__name__}")
    return False


class AgentRunner:
    """Calls one agent on ``[t, lo:hi]`` of a batch and writes its actions and infos.

    ``agent`` is either a callable ``policy(observation) -> action`` or an object with
    ``step(observation, prev_action, prev_reward[, env_ids]) -> (action, agent_info)``
    and optional ``reset``, ``reset_one``, ``value``, ``sample_mode``, ``eval_mode``.
    """

    def __init__(self, agent: Any):
        self.agent = agent
        self.protocol = check_agent(agent)
        self._step = getattr(agent, "step", None) if self.protocol else None
        self._ids = self.protocol and _accepts_env_ids(self._step)
        self._reset_one = getattr(agent, "reset_one", None) if self.protocol else None
        self._value = getattr(agent, "value", None) if self.protocol else None
        self._value_ids = self._value is not None and _accepts_env_ids(self._value)
        self._views: dict = {}  # (id(buffers), lo, hi) -> _SliceViews

    # -- lifecycle hooks; absent methods are no-ops ------------------------------------
    def call(self, name: str, *args) -> None:
        fn = getattr(self.agent, name, None) if self.protocol else None
        if callable(fn):
            fn(*args)

    def step(self, observation, prev_action, prev_reward, env_ids) -> tuple:
        """Return ``(action, agent_info_or_None)`` for one slice of envs."""
        if not self.protocol:
            return self.agent(observation), None
        if self._ids:
            out = self._step(observation, prev_action, prev_reward, env_ids=env_ids)
        else:
            out = self._step(observation, prev_action, prev_reward)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"agent.step must return (action, agent_info); "
                            f"got {type(out).__name__}")
        return out

    def value(self, observation, prev_action, prev_reward, env_ids) -> Any:
        if self._value_ids:
            return self._value(observation, prev_action, prev_reward, env_ids=env_ids)
        return self._value(observation, prev_action, prev_reward)

    def reset_started(self, starts: np.ndarray, env_ids: np.ndarray) -> None:
        """Call ``reset_one(env_id)`` for each env whose episode starts now."""
        if self._reset_one is not None and starts.any():
            for b in env_ids[starts]:
                self._reset_one(int(b))

    def act(self, view: dict, t: int, lo: int, hi: int, wait: bool, where: str) -> None:
        """Run the agent on step ``t`` of envs ``lo:hi`` of ``view`` and record its output.

        In wait mode, envs whose episode ended earlier in the batch get zero actions and
        infos. ``where`` names the caller for error messages.
        """
        if hi <= lo:  # a worker with no eval envs: agents need not handle empty batches
            return
        sv = self._views.get((id(view), lo, hi))
        if sv is None:
            sv = self._views[(id(view), lo, hi)] = _SliceViews(view, lo, hi, where)
        if self._reset_one is not None and (t == 0 or not wait):
            self.reset_started(sv.done[t - 1], sv.env_ids)
        action, info = self.step(sv.obs[t], sv.prev_action[t], sv.prev_reward[t], sv.env_ids)
        dst = sv.action[t]
        if (action.__class__ is np.ndarray and action.shape == dst.shape
                and action.dtype == dst.dtype):
            dst[...] = action
        else:
            write_checked(dst, action, sv.what, "agent.step returned")
        if sv.info:
            write_info(sv.info[t], info, sv.what)
        if wait and t > 0:
            waiting = sv.done[t - 1]
            if waiting.any():
                dst[waiting] = 0
                for _, arr in sv.info[t] if sv.info else ():
                    arr[waiting] = 0


class _SliceViews:
    """Views of envs ``lo:hi`` at every step of a batch, made once: the hot loop indexes lists."""

    def __init__(self, view: dict, lo: int, hi: int, where: str):
        T = view["action"].shape[0]
        obs = view["observation_full"]
        self.obs = [tree_map(lambda a, t=t: a[t, lo:hi], obs) for t in range(T + 1)]
        self.prev_action = [view["prev_action_full"][t, lo:hi] for t in range(T + 1)]
        self.prev_reward = [view["prev_reward_full"][t, lo:hi] for t in range(T + 1)]
        self.action = [view["action"][t, lo:hi] for t in range(T)]
        self.done = [view["done"][t, lo:hi] for t in range(T)]
        leaves = list(tree_leaves(view["agent_info"]))
        self.info = [[(p, a[t, lo:hi]) for p, a in leaves] for t in range(T)] if leaves else None
        self.env_ids = view["env_ids"][lo:hi]
        self.what = f"envs {lo}..{hi - 1} ({where})"


def write_checked(dst: np.ndarray, src: Any, what: str, verb: str) -> None:
    """Copy ``src`` into ``dst``; raise a clear error on a wrong shape or on any cast that
    would change a value (:func:`sampling.buffers.cast_problem`)."""
    a = src if isinstance(src, np.ndarray) else to_numpy(src)
    if a.shape != dst.shape:
        raise ValueError(f"{what}: {verb} shape {a.shape}, expected {dst.shape} "
                         f"(one row per env, each shaped like the action space)")
    problem = cast_problem(a, dst.dtype)
    if problem:
        raise TypeError(f"{what}: {verb} {problem}; expected {dst.dtype} (cast it in the agent)")
    np.copyto(dst, a, casting="unsafe")  # checked just above


def write_info(leaves: list, info: Any, what: str) -> None:
    """Write an agent_info dict into one step's views (a missing key is an error)."""
    if not isinstance(info, dict):
        raise TypeError(not_a_dict("agent.step", "agent_info", info, f"the call for {what}")
                        + "; it returned a dict on the first call: keep it consistent")
    for path, arr in leaves:
        try:
            v = get(info, path)
        except LookupError:
            raise KeyError(missing_entry("agent.step", f"agent_info{path_text(path)}",
                                         f"the call for {what}", "the first call")) from None
        if v.__class__ is np.ndarray and v.shape == arr.shape and v.dtype == arr.dtype:
            arr[...] = v
        else:
            write_checked(arr, v, f"agent_info{path_text(path)} for {what}",
                          "agent.step returned")
