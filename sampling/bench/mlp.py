"""The benchmark's ``--agent mlp``: a :class:`~sampling.torch_agent.TorchAgent` over an MLP.

Imports torch (so nothing imports this module but :func:`~sampling.bench.make_agent` and
``sampling.bench.MLPAgent``, on demand) and the core's torch adapter.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..torch_agent import TorchAgent
from .errors import BenchError

__all__ = ["MLPAgent", "HIDDEN", "ACTION_NOISE"]

HIDDEN = (64, 64)   # tanh layers: the policy size of many PPO baselines (e.g. CleanRL's)
ACTION_NOISE = 0.1  # the Gaussian's standard deviation for Box actions (fixed, not learned)


class MLPAgent(TorchAgent):
    """A small torch MLP policy (``hidden`` tanh layers in an ``nn.Sequential``).

    Discrete actions are sampled from the logits (``distribution="categorical"``); Box
    actions from a Gaussian around the outputs (``"gaussian"``, standard deviation
    ``ACTION_NOISE``), clipped to the box. ``step`` returns no ``agent_info``: the
    benchmark measures acting, not recording log-probabilities, and takes
    ``prev_action``/``prev_reward`` as optional. The ``cpu`` kind copies the weights
    (``shared_arrays()``) to its workers before every batch, as in training.
    """

    def __init__(self, observation_space: Any, action_space: Any,
                 hidden: Sequence[int] = HIDDEN, seed: int = 0):
        shape = getattr(observation_space, "shape", None)
        if shape is None:
            raise BenchError(f"the mlp agent needs an array observation space, got "
                             f"{observation_space!r}")
        discrete = hasattr(action_space, "n") and not hasattr(action_space, "nvec")
        if discrete:
            n_out = int(action_space.n)
        elif hasattr(action_space, "low") and getattr(action_space, "shape", None) is not None:
            n_out = int(np.prod(action_space.shape))
        else:
            raise BenchError(f"the mlp agent supports Discrete and Box action spaces, got "
                             f"{action_space!r}")
        with torch.random.fork_rng():  # the user's torch random stream stays untouched
            torch.manual_seed(seed)
            model = _mlp(int(np.prod(shape)), tuple(hidden), n_out)
        if not discrete:
            model.log_std = torch.nn.Parameter(torch.full((n_out,), math.log(ACTION_NOISE)))
        model.requires_grad_(False)
        super().__init__(model, distribution="categorical" if discrete else "gaussian",
                         seed=seed)
        self.observation_space, self.action_space = observation_space, action_space
        self.hidden = tuple(hidden)
        self._start = int(getattr(action_space, "start", 0)) if discrete else 0
        self._low = None if discrete else np.asarray(action_space.low)
        self._high = None if discrete else np.asarray(action_space.high)
        self._act_shape = tuple(action_space.shape)
        self._dtype = np.dtype(action_space.dtype)

    def forward(self, observation, prev_action, prev_reward, state=None) -> tuple:
        return self.model(observation.reshape(len(observation), -1).float()), None, None

    def step(self, observation, prev_action=None, prev_reward=None, env_ids=None):
        n = len(observation)
        if prev_action is None:
            prev_action = np.zeros((n,) + self._act_shape, self._dtype)
        if prev_reward is None:
            prev_reward = np.zeros(n, np.float32)
        a, _ = super().step(observation, prev_action, prev_reward, env_ids)
        a = a.reshape((n,) + self._act_shape)
        if self._start:
            a = a + self._start
        if self._low is not None:
            a = np.clip(a, self._low, self._high)
        return a.astype(self._dtype, copy=False), None


def _mlp(n_in: int, hidden: tuple, n_out: int) -> torch.nn.Sequential:
    layers, width = [], n_in
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.Tanh()]
        width = h
    layers.append(torch.nn.Linear(width, n_out))
    return torch.nn.Sequential(*layers)
