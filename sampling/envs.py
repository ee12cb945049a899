"""Built-in numpy-only envs, so demos, tests and benchmarks run without gymnasium.

Imports only numpy and :mod:`sampling.spaces`. ``CartPole`` follows the dynamics,
rewards and limits of gymnasium's ``CartPole-v1``; ``step_cost_us`` makes each step
burn that much CPU time, to stand in for an expensive simulator.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .spaces import Box, Discrete

__all__ = ["CartPole", "make_cartpole"]


class CartPole:
    """Balance a pole on a cart; reward 1 per step, truncated at ``max_episode_steps``."""

    metadata: dict = {}

    def __init__(self, max_episode_steps: int = 500, step_cost_us: float = 0.0):
        self.gravity, self.masscart, self.masspole, self.length = 9.8, 1.0, 0.1, 0.5
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length
        self.force_mag, self.tau = 10.0, 0.02
        self.theta_threshold = 12 * 2 * math.pi / 360
        self.x_threshold = 2.4
        high = np.array([self.x_threshold * 2, np.inf, self.theta_threshold * 2, np.inf],
                        dtype=np.float32)
        self.observation_space = Box(-high, high, dtype=np.float32)
        self.action_space = Discrete(2)
        self.max_episode_steps = int(max_episode_steps)
        self.step_cost_s = float(step_cost_us) * 1e-6
        self._rng = np.random.default_rng()
        self._state = (0.0, 0.0, 0.0, 0.0)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._state = tuple(float(v) for v in self._rng.uniform(-0.05, 0.05, size=4))
        self._t = 0
        return np.array(self._state, dtype=np.float32), {}

    def step(self, action):
        if action != 0 and action != 1:
            raise ValueError(f"CartPole action must be 0 or 1, got {action!r}")
        if self.step_cost_s:
            _burn(self.step_cost_s)
        x, x_dot, theta, theta_dot = self._state
        force = self.force_mag if action == 1 else -self.force_mag
        costheta, sintheta = math.cos(theta), math.sin(theta)
        temp = (force + self.polemass_length * theta_dot * theta_dot * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * costheta * costheta / self.total_mass))
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        x += self.tau * x_dot
        x_dot += self.tau * xacc
        theta += self.tau * theta_dot
        theta_dot += self.tau * thetaacc
        self._state = (x, x_dot, theta, theta_dot)
        self._t += 1
        terminated = (x < -self.x_threshold or x > self.x_threshold
                      or theta < -self.theta_threshold or theta > self.theta_threshold)
        truncated = not terminated and self._t >= self.max_episode_steps
        return np.array(self._state, dtype=np.float32), 1.0, terminated, truncated, {}

    def close(self) -> None:
        pass


def _burn(seconds: float) -> None:
    # CPU time of this thread, not wall time: a descheduled worker must not count as busy.
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def make_cartpole(max_episode_steps: int = 500, step_cost_us: float = 0.0):
    """Factory for ``--env sampling.envs:make_cartpole`` and for picklable env_fns."""
    return CartPole(max_episode_steps=max_episode_steps, step_cost_us=step_cost_us)
