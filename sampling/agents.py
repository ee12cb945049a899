"""The agent protocol: wrap a plain policy or an rlpyt-style agent, and run it on a batch slice.

Imports numpy, :mod:`sampling.buffers` and :mod:`sampling.spaces`. Every kind calls the
agent through :class:`AgentRunner`, so "who calls the agent" (parent or worker) is the
only thing a kind decides.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from .buffers import is_tree, tree_leaves, tree_map
from .spaces import random_action_fn

__all__ = ["RandomAgent", "AgentRunner"]


class RandomAgent:
    """Uniformly random actions from ``action_space``; ignores observations.

    Vectorized (one draw per call for all envs), so it measures the sampler, not itself.
    """

    def __init__(self, action_space: Any, seed: int | None = 0):
        self.action_space = action_space
        self.seed = seed
        self._sample = random_action_fn(action_space, np.random.default_rng(seed))

    def step(self, observation, prev_action=None, prev_reward=None, env_ids=None):
        n = len(prev_reward) if prev_reward is not None else len(next(iter(
            dict(tree_leaves(observation)).values())))
        return self._sample(n), None

    def __getstate__(self):
        return {"action_space": self.action_space, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["action_space"], state["seed"])


def _accepts_env_ids(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "env_ids" or p.kind is p.VAR_KEYWORD for p in params)


class AgentRunner:
    """Calls one agent on ``[t, lo:hi]`` of a batch and writes its actions and infos.

    ``agent`` is either a callable ``policy(observation) -> action`` or an object with
    ``step(observation, prev_action, prev_reward[, env_ids]) -> (action, agent_info)``
    and optional ``reset``, ``reset_one``, ``value``, ``sample_mode``, ``eval_mode``.
    """

    def __init__(self, agent: Any):
        self.agent = agent
        step = getattr(agent, "step", None)
        self.protocol = callable(step)
        if not self.protocol and not callable(agent):
            raise TypeError(
                f"agent must be a callable policy(observation) -> action or an object with a "
                f"step(observation, prev_action, prev_reward) method; got {type(agent).__name__}")
        self._step = step if self.protocol else None
        self._ids = self.protocol and _accepts_env_ids(step)
        self._reset_one = getattr(agent, "reset_one", None) if self.protocol else None
        value = getattr(agent, "value", None) if self.protocol else None
        self._value = value
        self._value_ids = value is not None and _accepts_env_ids(value)

    # -- lifecycle hooks; absent methods are no-ops ------------------------------------
    def call(self, name: str, *args) -> None:
        fn = getattr(self.agent, name, None) if self.protocol else None
        if callable(fn):
            fn(*args)

    @property
    def has_value(self) -> bool:
        return callable(self._value)

    def step(self, observation, prev_action, prev_reward, env_ids) -> tuple:
        """Return ``(action, agent_info_or_None)`` for one slice of envs."""
        if not self.protocol:
            return self.agent(observation), None
        if self._ids:
            out = self._step(observation, prev_action, prev_reward, env_ids=env_ids)
        else:
            out = self._step(observation, prev_action, prev_reward)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"agent.step must return (action, agent_info); got {type(out).__name__}")
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
        done = view["done"]
        if self._reset_one is not None and (t == 0 or not wait):
            self.reset_started(done[t - 1, lo:hi], view["env_ids"][lo:hi])
        obs = view["observation_full"]
        obs = tree_map(lambda a: a[t, lo:hi], obs) if is_tree(obs) else obs[t, lo:hi]
        action, info = self.step(obs, view["prev_action_full"][t, lo:hi],
                                 view["prev_reward_full"][t, lo:hi], view["env_ids"][lo:hi])
        dst = view["action"][t, lo:hi]
        write_checked(dst, action, f"agent action for envs {lo}..{hi - 1} ({where})",
                      "agent.step returned")
        if view["agent_info"]:
            write_info(view["agent_info"], t, lo, hi, info, where)
        if wait and t > 0:
            waiting = done[t - 1, lo:hi]
            if waiting.any():
                dst[waiting] = 0
                for _, arr in tree_leaves(view["agent_info"]):
                    arr[t, lo:hi][waiting] = 0


def write_checked(dst: np.ndarray, src: Any, what: str, verb: str) -> None:
    """Copy ``src`` into ``dst``; raise a clear error on a wrong shape or an unsafe cast."""
    if hasattr(src, "detach"):  # a torch tensor
        src = src.detach().cpu().numpy()
    a = src if isinstance(src, np.ndarray) else np.asarray(src)
    if a.shape != dst.shape:
        raise ValueError(f"{what}: {verb} shape {a.shape}, expected {dst.shape} "
                         f"(one row per env, each shaped like the action space)")
    try:
        np.copyto(dst, a, casting="same_kind")
    except TypeError as e:
        raise TypeError(f"{what}: {verb} dtype {a.dtype}, which cannot be stored as "
                        f"{dst.dtype}") from e


def write_info(bufs: dict, t: int, lo: int, hi: int, info: Any, where: str) -> None:
    """Write an agent_info dict into its ``[T, B]`` buffers (missing keys are an error)."""
    if info is None:
        raise ValueError(f"agent.step returned agent_info=None for envs {lo}..{hi - 1} ({where}) "
                         f"but returned a dict on the first call; keep it consistent")
    for path, arr in tree_leaves(bufs):
        v = info
        try:
            for k in path:
                v = v[k]
        except (KeyError, TypeError, IndexError):
            raise KeyError(f"agent_info is missing {'/'.join(map(str, path))!r} for envs "
                           f"{lo}..{hi - 1} ({where}); it had it on the first call") from None
        write_checked(arr[t, lo:hi], v, f"agent_info[{'/'.join(map(str, path))!r}] for envs "
                      f"{lo}..{hi - 1} ({where})", "agent.step returned")
