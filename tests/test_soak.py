"""Soak: millions of env steps must not grow memory or file descriptors.

Excluded by default (setup.cfg: -m "not slow"); run with
``PYTHONPATH=. python -m pytest -m slow tests/test_soak.py -s`` (``-s`` shows the figures).
``SAMPLING_SOAK_STEPS`` sets the env steps per kind (default 2,000,000).
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import time

import pytest

import sampling
from tests.helpers import PARALLEL, cartpole_policy, one_per

pytestmark = pytest.mark.slow

STEPS = int(os.environ.get("SAMPLING_SOAK_STEPS", 2_000_000))
RSS_GROWTH_KB = 20 * 1024  # per process, between warm-up and the end
T, B = 256, 16


def _rss_kb(pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def _fds(pid="self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _snapshot(pids: list) -> dict:
    gc.collect()
    return {"parent": (_rss_kb(), _fds()),
            **{f"worker {i}": (_rss_kb(p), _fds(p)) for i, p in enumerate(pids)}}


@pytest.mark.parametrize("kind", one_per("driver", kinds=PARALLEL))
def test_soak_memory_and_fds_stay_flat(kind):
    n_batches = max(20, -(-STEPS // (T * B)))
    warmup = max(5, n_batches // 10)
    eval_every = max(2, n_batches // 10)  # batches
    episodes = evals = 0
    with sampling.make_sampler(kind, sampling.CartPole, cartpole_policy, batch_T=T, batch_B=B,
                               n_workers=2, eval_n_envs=2, eval_max_steps=2000,
                               start_method="fork") as sampler:
        pids = [p.pid for p in mp.active_children() if p.name.startswith("sampling-")]
        assert len(pids) == 2
        for i, batch in enumerate(sampler.steps(n_batches)):
            episodes += len(batch.traj_infos)
            if i % eval_every == eval_every - 1:
                sampler.evaluate_agent(i)
                evals += 1
            if i == warmup - 1:
                start = _snapshot(pids)
                t0, steps0 = time.perf_counter(), (i + 1) * T * B
        elapsed = time.perf_counter() - t0
        end = _snapshot(pids)
        del batch
    steps = n_batches * T * B
    rate = (steps - steps0) / elapsed
    print(f"\nSOAK {kind}: {steps:,} env steps ({n_batches} batches of {T}x{B}, "
          f"{episodes} episodes, {evals} evaluations), {rate:,.0f} steps/s after warm-up")
    for who in start:
        (r0, f0), (r1, f1) = start[who], end[who]
        print(f"SOAK {kind} {who}: RSS {r0 / 1024:.1f} -> {r1 / 1024:.1f} MiB "
              f"({(r1 - r0) / 1024:+.1f}), fds {f0} -> {f1}")
    assert episodes > 0 and evals > 0
    for who in start:
        (r0, f0), (r1, f1) = start[who], end[who]
        assert r1 - r0 < RSS_GROWTH_KB, f"{who}: RSS grew by {(r1 - r0) / 1024:.1f} MiB"
        assert f1 == f0, f"{who}: open fds {f0} -> {f1}"
