"""The kinds table and the worker pool, used on their own as a new kind or a new program would."""
from __future__ import annotations

import functools
import gc
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass

import numpy as np
import pytest

import sampling
from sampling.errors import WorkerError
from sampling.kinds import Kind, worker_count
from sampling.pool import Close, Done, Pool, PoolSpec, Ready
from tests.helpers import CountingAgent, CountingEnv, assert_batches_equal, snapshot

METHODS = mp.get_all_start_methods()
COUNTING = functools.partial(CountingEnv, lengths=(3, 5, 4, 7))


def run(kind, n, **kw) -> list:
    with sampling.make_sampler(kind, COUNTING, CountingAgent(), **kw) as s:
        return [snapshot(b) for b in s.steps(n)]


# -- kinds: a row names its driver; impossible rows fail at definition --------------------
@pytest.mark.parametrize("row, match", [
    (dict(driver="threads"), "unknown driver 'threads'"),
    (dict(driver="served", groups=1, overlap=False), "without overlap needs groups >= 2"),
    (dict(driver="in_process", groups=2), "has one group and no overlap"),
    (dict(driver="worker_agents", overlap=True), "has one group and no overlap"),
    (dict(driver="served", groups=0, overlap=True), "groups must be an int >= 1"),
])
def test_an_impossible_kind_row_is_refused(row, match):
    with pytest.raises(ValueError, match=match):
        Kind(**row)


def test_every_kind_row_names_a_driver():
    assert {k.driver for k in sampling.KINDS.values()} == {"in_process", "worker_agents",
                                                           "served"}


def test_a_new_kind_is_a_row(monkeypatch):
    # Three groups served in turn: no driver code of its own, and the same batches as serial.
    monkeypatch.setitem(sampling.KINDS, "three_groups", Kind("served", groups=3, overlap=False))
    assert worker_count("three_groups", 6, 3) == 3
    with pytest.raises(ValueError, match=r"a number divisible by 3 of workers .*n_workers=4"):
        worker_count("three_groups", 8, 4)
    with pytest.raises(ValueError, match=r"3 equal groups: batch_B=7 over n_workers=3"):
        worker_count("three_groups", 7, 3)
    got = run("three_groups", 2, batch_T=5, batch_B=6, n_workers=3, start_method="fork")
    ref = run("serial", 2, batch_T=5, batch_B=6)
    for g, r in zip(got, ref):
        assert_batches_equal(g, r)


# -- the pool on its own --------------------------------------------------------------------
@dataclass(frozen=True)
class Add:
    x: int


class Boom(Exception):
    pass


class Closable:
    def __init__(self, path):
        self.path = path

    def close(self):
        with open(self.path, "w") as f:
            f.write("closed")


def adder(link, arrays, config):
    """A program: adds its config to each number it is sent; worker 0 (add 0) raises on 13
    and dies on a negative number."""
    link.envs.append(Closable(config["closed_file"]))
    link.send(Ready())
    while True:
        cmd = link.recv()
        if isinstance(cmd, Close):
            return
        if cmd.x == 13 and config["add"] == 0:
            raise Boom("unlucky")
        if cmd.x < 0 and config["add"] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        link.send(Done(cmd.x + config["add"]))


def _pool(tmp_path, method, n=2):
    pool = Pool()
    configs = [{"add": 10 * w, "closed_file": str(tmp_path / f"closed-{w}")} for w in range(n)]
    pool.start(PoolSpec(program=adder, configs=configs, shared=None, placed={},
                        labels=[f"adder {w}" for w in range(n)], envs=[[w] for w in range(n)],
                        start_method=method, name="sampling-test-pool"))
    return pool


@pytest.mark.start_method_matters  # the program and its configs travel to each worker
@pytest.mark.parametrize("method", METHODS)
def test_pool_runs_a_program_and_closes_what_it_built(method, tmp_path):
    pool = _pool(tmp_path, method)
    try:
        pool.send(Add(1))
        assert pool.gather(range(2)) == {0: 1, 1: 11}
    finally:
        pool.stop(graceful=True)
    assert pool.size == 0 and not mp.active_children()
    assert all((tmp_path / f"closed-{w}").read_text() == "closed" for w in range(2))


@pytest.mark.start_method_matters
@pytest.mark.parametrize("method", METHODS)
def test_pool_raises_a_programs_error_with_its_traceback(method, tmp_path):
    pool = _pool(tmp_path, method)
    try:
        pool.send(Add(13))
        with pytest.raises(WorkerError, match=r"adder 0 raised Boom: unlucky") as ei:
            pool.gather(range(2))
        assert isinstance(ei.value.__cause__, Boom)
        assert "raise Boom" in ei.value.remote_traceback
    finally:
        pool.stop(graceful=False)
    assert not mp.active_children()
    # SIGTERM made the other worker close what it built; the failed one closed its own
    assert all((tmp_path / f"closed-{w}").read_text() == "closed" for w in range(2))


@pytest.mark.start_method_matters
@pytest.mark.parametrize("method", METHODS)
def test_pool_reports_a_death(method, tmp_path):
    pool = _pool(tmp_path, method)
    try:
        pool.send(Add(-1))
        with pytest.raises(WorkerError, match=r"adder 0 was killed by signal SIGKILL") as ei:
            pool.gather(range(2))
        assert ei.value.exitcode == -signal.SIGKILL and ei.value.envs == [0]
    finally:
        pool.stop(graceful=False)
    assert not mp.active_children()


def test_pool_handoff_semaphores_have_no_name_after_start(tmp_path):
    pool = _pool(tmp_path, "spawn" if "spawn" in METHODS else None)
    try:
        names = [getattr(s._semlock, "name", None) for pair in pool.sems for s in pair]
        shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        assert not any(n and ("sem." + n.lstrip("/")) in shm for n in names)
        pool.send(Add(2))
        assert pool.gather([0, 1]) == {0: 2, 1: 12}
    finally:
        pool.stop(graceful=True)
    assert np.all([p is None for p in pool.procs]) and not mp.active_children()


@pytest.mark.parametrize("kind", list(sampling.KINDS))
def test_a_dropped_sampler_closes_at_once_without_the_cyclic_gc(kind):
    # No reference cycle may hold a sampler: dropped, its finalizer runs at once and stops
    # its workers (a cycle would leave them running until the cyclic GC happens to run).
    gc.disable()
    try:
        s = sampling.make_sampler(kind, COUNTING, CountingAgent(), batch_T=4, batch_B=4,
                                  n_workers=2 if sampling.KINDS[kind].workers else None,
                                  start_method="fork")
        s.obtain_samples()
        del s
        assert not mp.active_children()
    finally:
        gc.enable()
