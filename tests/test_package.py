"""Package hygiene: imports, public names, worker CPU affinity."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import sampling
from tests.helpers import ROOT, one_per


@pytest.mark.tooling
def test_import_has_no_heavy_or_side_effects():
    code = ("import sys, sampling, sampling.envs, sampling.spaces, multiprocessing; "
            "bad = [m for m in ('torch', 'gymnasium', 'gym') if m in sys.modules]; "
            "assert not bad, bad; assert not multiprocessing.active_children(); "
            "from multiprocessing import resource_tracker as rt; "
            "assert getattr(rt._resource_tracker, '_pid', None) is None, 'tracker started'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr


@pytest.mark.tooling
def test_public_names():
    assert sampling.__version__
    for name in sampling.__all__:
        assert hasattr(sampling, name), name
    assert set(sampling.KINDS) == {"serial", "cpu", "gpu", "alternating",
                                   "no_overlap_alternating"}


class AffinityAgent:
    """Records the worker's CPU affinity (as a bitmask) in agent_info."""

    def step(self, observation, prev_action, prev_reward):
        mask = sum(1 << c for c in os.sched_getaffinity(0))
        n = len(observation)
        return np.zeros(n, np.int64), {"mask": np.full(n, mask, np.int64)}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_setaffinity")
def test_cpu_affinity_pins_each_worker():
    cpus = sorted(os.sched_getaffinity(0))
    pins = [[cpus[0]], [cpus[-1]]]
    with sampling.make_sampler("cpu", sampling.CartPole, AffinityAgent(), batch_T=2, batch_B=4,
                               n_workers=2, cpu_affinity=pins) as s:
        mask = s.obtain_samples().agent_info["mask"]
    assert (mask[:, :2] == 1 << cpus[0]).all()
    assert (mask[:, 2:] == 1 << cpus[-1]).all()


def test_cpu_affinity_is_validated():
    with pytest.raises(ValueError, match="may not use"):
        sampling.make_sampler("cpu", sampling.CartPole, AffinityAgent(), batch_T=2, batch_B=2,
                              cpu_affinity=[[10_000]])
    with pytest.raises(TypeError, match="one non-empty list of CPU ids"):
        sampling.make_sampler("cpu", sampling.CartPole, AffinityAgent(), batch_T=2, batch_B=2,
                              cpu_affinity=[0, 1])


class ChainEnv:
    """Scalar (Discrete-like) observations returned as 0-d arrays: 0, 1, 2, 3, then reset."""

    def __init__(self):
        from sampling.spaces import Discrete
        self.observation_space, self.action_space = Discrete(10), Discrete(2)
        self.s = 0

    def reset(self, *, seed=None, options=None):
        self.s = 0
        return np.array(self.s), {}

    def step(self, action):
        self.s += 1
        return np.array(self.s), 1.0, self.s >= 4, False, {}

    def close(self):
        pass


@pytest.mark.parametrize("kind", one_per("driver"))
def test_scalar_observations(kind):
    n_workers = 2 if sampling.KINDS[kind].workers else None
    with sampling.make_sampler(kind, ChainEnv, lambda o: np.zeros(len(o), np.int64),
                               batch_T=6, batch_B=2, n_workers=n_workers,
                               start_method="fork") as s:
        batch = s.obtain_samples()
    assert batch.observation.shape == (6, 2) and batch.observation.dtype == np.int64
    np.testing.assert_array_equal(batch.observation[:, 0], [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(batch.done[:, 1], [0, 0, 0, 1, 0, 0])
