"""Built-in numpy-only envs, so demos, tests and benchmarks run without gymnasium.

Imports only numpy and :mod:`sampling.spaces`. ``CartPole`` follows the dynamics,
rewards and limits of gymnasium's ``CartPole-v1``; ``step_cost_us`` makes each step
burn that much CPU time, to stand in for an expensive simulator. ``VectorCartPole`` steps
``num_envs`` of them in one call, with gymnasium's vector-env API (``VectorEnv``, 1.x).
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np

from .spaces import Box, Discrete

__all__ = ["CartPole", "make_cartpole", "VectorCartPole", "make_vector_cartpole", "AUTORESET_MODES"]


class CartPole:
    """Balance a pole on a cart; reward 1 per step, truncated at ``max_episode_steps``."""

    metadata: dict = {}
    render_mode = None  # gymnasium's Env attribute: this env renders nothing

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


# gymnasium's AutoresetMode values (the enum itself, or its value, is accepted): what a
# vector env does with a sub-env whose episode ended at a step.
#   NextStep  its next step() call resets it instead of stepping (gymnasium's default);
#   SameStep  it is reset within that step: the returned observation is the new episode's,
#             the final one is in infos["final_obs"] (where infos["_final_obs"] is True);
#   Disabled  nothing: the caller resets it with reset(options={"reset_mask": mask}).
AUTORESET_MODES = ("NextStep", "SameStep", "Disabled")


class VectorCartPole:
    """``num_envs`` CartPoles stepped in one call, with numpy: step for step, sub-env ``i``
    is a :class:`CartPole` (the same dynamics, order of operations and seeding; reset
    with ``seed[i]`` it gives the same observations, rewards and flags).

    The API of gymnasium's ``VectorEnv`` (duck-typed, gymnasium is not needed):
    ``num_envs``, ``single_observation_space``, ``single_action_space``,
    ``reset(seed=int|list, options={"reset_mask": mask})`` and ``step(actions[num_envs])``
    returning ``[num_envs]``-leading arrays; ``metadata["autoreset_mode"]`` says what
    happens to an ended sub-env (see :data:`AUTORESET_MODES`).
    """

    def __init__(self, num_envs: int = 16, max_episode_steps: int = 500,
                 step_cost_us: float = 0.0, autoreset_mode: object = "SameStep"):
        mode = getattr(autoreset_mode, "value", autoreset_mode)
        if mode not in AUTORESET_MODES:
            raise ValueError(f"autoreset_mode must be one of {', '.join(AUTORESET_MODES)} "
                             f"(or gymnasium's AutoresetMode), got {autoreset_mode!r}")
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        self.num_envs = num_envs
        self.metadata = {"autoreset_mode": autoreset_mode}
        self._mode = mode
        one = CartPole(max_episode_steps, step_cost_us)
        self._c = one  # the constants
        self.single_observation_space, self.single_action_space = (one.observation_space,
                                                                   one.action_space)
        high = one.observation_space.high
        self.observation_space = Box(np.broadcast_to(-high, (num_envs, 4)),
                                     np.broadcast_to(high, (num_envs, 4)), dtype=np.float32)
        self.action_space = Box(0, 1, shape=(num_envs,), dtype=np.int64)
        self._rngs = [np.random.default_rng() for _ in range(num_envs)]
        self._state = np.zeros((num_envs, 4))
        self._rate = np.zeros((num_envs, 4))  # per step: tau * d(state)/dt, by column
        self._forces = np.array([-one.force_mag, one.force_mag])  # by action
        self._limits = np.array([one.x_threshold, one.theta_threshold])
        # CartPole's constants as 0-d float64 arrays: the same products, but numpy takes an
        # array operand in ~0.3 us where it converts a Python float in ~0.5 us
        self._consts = SimpleNamespace(**{name: np.array(getattr(one, name)) for name in (
            "polemass_length", "total_mass", "gravity", "length", "masspole", "tau")},
            four_thirds=np.array(4.0 / 3.0))
        self._t = np.zeros(num_envs, np.int64)
        self._ended = np.zeros(num_envs, bool)  # NextStep: reset at the next step

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        """Reset every sub-env (``seed``: an int seeds sub-env i with ``seed + i``; a list
        gives each its own), or only those in ``options["reset_mask"]``."""
        n = self.num_envs
        mask = np.ones(n, bool) if not options or "reset_mask" not in options else \
            np.asarray(options["reset_mask"], bool)
        if mask.shape != (n,):
            raise ValueError(f"reset_mask must be {n} bools, got shape {mask.shape}")
        if seed is not None:
            seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
            if len(seeds) != n:
                raise ValueError(f"seed must be an int or {n} seeds, got {len(seeds)}")
            for i in np.flatnonzero(mask):
                if seeds[i] is not None:
                    self._rngs[i] = np.random.default_rng(seeds[i])
        self._reset(mask)
        return self._state.astype(np.float32), {}

    def _reset(self, mask: np.ndarray) -> None:
        for i in np.flatnonzero(mask):  # one draw per sub-env, as CartPole.reset does
            self._state[i] = self._rngs[i].uniform(-0.05, 0.05, size=4)
        self._t[mask] = 0
        self._ended[mask] = False

    def step(self, actions):
        """Step every sub-env with ``actions[i]`` (0 or 1)."""
        # Each numpy call on 16 elements costs ~0.5-1 us, about what the arithmetic of all
        # 16 costs: this step is counted in calls (~40). The dynamics keep CartPole's
        # expressions and order of operations, so each sub-env's floats are CartPole's.
        a = np.asarray(actions)
        n, c = self.num_envs, self._c
        bad = a.shape != (n,) or a.dtype.kind not in "iub"
        u = None if bad else a.astype(np.uint64)  # a negative int becomes > 1; an index
        if bad or np.count_nonzero(u > 1):
            raise ValueError(f"VectorCartPole actions must be {n} ints in {{0, 1}}, got "
                             f"{actions!r:.80}")
        if c.step_cost_s:
            _burn(c.step_cost_s * n)
        s, rate, k = self._state, self._rate, self._consts
        theta, theta_dot = s[:, 2], s[:, 3]
        force = self._forces[u]  # CartPole's force_mag if action == 1 else -force_mag
        costheta, sintheta = np.cos(theta), np.sin(theta)
        temp = (force + k.polemass_length * theta_dot * theta_dot * sintheta) / k.total_mass
        # thetaacc and xacc go straight into the rates' columns 3 and 1
        thetaacc = np.divide(k.gravity * sintheta - costheta * temp, k.length * (
            k.four_thirds - k.masspole * costheta * costheta / k.total_mass), out=rate[:, 3])
        np.subtract(temp, k.polemass_length * thetaacc * costheta / k.total_mass,
                    out=rate[:, 1])
        rate[:, 0::2] = s[:, 1::2]  # x_dot and theta_dot as they were before the step
        ended = (self._ended.copy() if self._mode == "NextStep"
                 and np.count_nonzero(self._ended) else None)
        # CartPole's x += tau * x_dot, x_dot += tau * xacc, ..., each from the values before
        # the step: one multiply and one add for the four
        np.multiply(rate, k.tau, out=rate)
        s += rate
        self._t += 1
        # |x| > limit is CartPole's x < -limit or x > limit (x and theta: columns 0 and 2)
        out = np.abs(s[:, 0::2]) > self._limits
        term = out[:, 0] | out[:, 1]
        trunc = (self._t >= c.max_episode_steps) > term  # and not terminated
        reward = np.ones(n)
        if ended is not None:  # NextStep: these reset instead of stepping (state overwritten)
            self._reset(ended)
            term[ended] = trunc[ended] = False
            reward[ended] = 0.0
        done = term | trunc
        obs = s.astype(np.float32)
        infos: dict = {}
        if self._mode == "NextStep":
            self._ended = done
        elif self._mode == "SameStep" and np.count_nonzero(done):
            final = np.empty(n, object)
            for i in np.flatnonzero(done):
                final[i] = obs[i].copy()
            self._reset(done)
            obs = s.astype(np.float32)
            infos = {"final_obs": final, "_final_obs": done.copy(),
                     "final_info": {}, "_final_info": done.copy()}
        return obs, reward, term, trunc, infos

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


def make_vector_cartpole(num_envs: int = 16, max_episode_steps: int = 500,
                         step_cost_us: float = 0.0, autoreset_mode: object = "SameStep"):
    """Factory of :class:`VectorCartPole` (picklable, for env_fns)."""
    return VectorCartPole(num_envs, max_episode_steps, step_cost_us, autoreset_mode)
