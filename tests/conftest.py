"""Shared fixtures: ``no_leaks`` checks that a test leaves no worker process and no
/dev/shm entry (shared-memory segment or named semaphore) that it created."""
from __future__ import annotations

import gc
import multiprocessing as mp
import multiprocessing.process
import multiprocessing.shared_memory
import multiprocessing.synchronize
import os
import time

import pytest

import sampling
from tests.helpers import alive, kill_all, shm_entries


class LeakWatch:
    """The /dev/shm names (shared-memory segments, and semaphores: ``sem.mp-*`` under
    spawn/forkserver) created in this process while it watches, and the pids of the
    processes it started (``pids``, in start order). Other processes share /dev/shm, so
    only the names recorded here count."""

    def __init__(self):
        self.before = shm_entries()
        self.created: set = set()
        self.pids: list = []

    def record(self, monkeypatch) -> LeakWatch:
        shm_init = mp.shared_memory.SharedMemory.__init__
        sem_init = mp.synchronize.SemLock.__init__
        start = mp.process.BaseProcess.start
        created, pids = self.created, self.pids

        def shm_init_rec(self, name=None, create=False, size=0, *args, **kwargs):
            shm_init(self, name, create, size, *args, **kwargs)
            if create:
                created.add(self.name.lstrip("/"))

        def sem_init_rec(self, *args, **kwargs):
            sem_init(self, *args, **kwargs)
            name = self._semlock.name  # None where it is unlinked at once (fork)
            if name:
                created.add("sem." + name.lstrip("/"))

        def start_rec(self):
            start(self)
            pids.append(self.pid)

        monkeypatch.setattr(mp.shared_memory.SharedMemory, "__init__", shm_init_rec)
        monkeypatch.setattr(mp.synchronize.SemLock, "__init__", sem_init_rec)
        monkeypatch.setattr(mp.process.BaseProcess, "start", start_rec)
        return self

    def present(self) -> set:
        """The recorded names that exist in /dev/shm now."""
        return (shm_entries() - self.before) & self.created

    def alive(self) -> list:
        """The recorded processes that are still alive (zombies are not)."""
        return [p for p in self.pids if alive(p)]

    def check(self, wait_s: float = 5.0, started: bool = False) -> None:
        """Raise AssertionError if a child process or a recorded process is alive (after
        up to ``wait_s`` s), or a recorded name is left in /dev/shm (after a garbage
        collection). ``started``: also fail unless the watch saw a name created and a
        process started (the test meant to watch a sampler with workers)."""
        gc.collect()
        if started:
            assert self.created, "the watch saw no shared-memory segment being created"
            assert self.pids, "the watch saw no worker process being started"
        deadline = time.monotonic() + wait_s
        while (mp.active_children() or self.alive()) and time.monotonic() < deadline:
            time.sleep(0.02)
        children = mp.active_children()
        assert not children, f"child processes still alive after the test: {children}"
        running = self.alive()
        assert not running, f"processes started by the test still alive: {running}"
        leaked = self.present()
        semaphores = sorted(n for n in leaked if n.startswith("sem."))
        assert not leaked, (f"left in /dev/shm after the test: {sorted(leaked)}"
                            + (f" ({len(semaphores)} named semaphores)" if semaphores else ""))

    def assert_clean(self) -> None:
        """Nothing the sampler created is left, right now (no waiting): call after
        dropping the sampler and the exception (a sampler's names are unlinked once its
        workers are ready, or when it closes)."""
        self.check(wait_s=0, started=True)


@pytest.fixture
def no_leaks(monkeypatch):
    """After the test: no live child process or process the test started, and none of the
    /dev/shm names (segments, ``sem.mp-*`` semaphores) this process created during the
    test is left. Yields the :class:`LeakWatch`, whose ``created``, ``pids``,
    ``present()``, ``alive()`` and ``assert_clean()`` a test may use earlier. Whatever
    the outcome, a recorded process still alive is SIGKILLed (no orphan outlives a test)."""
    watch = LeakWatch().record(monkeypatch)
    try:
        yield watch
        watch.check()
    finally:
        kill_all(watch.pids)


# auto's choice depends on the CPUs this process may use; tests of what auto does beyond
# "1 usable CPU: serial" need at least 2, which `taskset -c 0 pytest` (or a 1-CPU container)
# would not give them.
PRETENDED_CPUS = 2


@pytest.fixture
def two_usable_cpus(monkeypatch):
    """This process may use 2 CPUs, whatever its affinity mask: auto measures and decides
    as on a 2-core machine (sampling.usable_cpus() reads the affinity mask, or the CPU
    count where there is none)."""
    cpus = set(range(PRETENDED_CPUS))
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus))
    monkeypatch.setattr(os, "cpu_count", lambda: PRETENDED_CPUS)
    assert sampling.usable_cpus() == PRETENDED_CPUS


# Python >= 3.12 warns (DeprecationWarning "This process ... is multi-threaded, use of fork()
# may lead to deadlocks in the child") when a process with more than one thread forks. Under
# pytest-xdist every test process has a second thread: execnet's receiver, which blocks reading
# its own pipe from the controller and dispatches messages under its own locks. A child forked
# by multiprocessing keeps only the forking (main) thread and never touches execnet's objects
# (it runs the worker loop and leaves with os._exit), so no lock it needs can be held by the
# vanished thread: those forks are safe, and the warning is noise there. It is ignored only in
# xdist workers, by its message (not by module: pytest.warns re-emits the warnings it did not
# expect as coming from `warnings`): under `pytest -n 0` a fork from a process with another
# thread (started by the library, a test, or torch) is still reported.
# (`-W error::DeprecationWarning` cannot show this warning at all: the fork has happened, so
# CPython drops the error; count the warning in pytest's summary instead.)
FORK_WITH_THREADS_FILTER = (
    r"ignore:This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"
    r" in the child:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker (how xdist itself tells)
        for item in items:
            item.add_marker(pytest.mark.filterwarnings(FORK_WITH_THREADS_FILTER))
