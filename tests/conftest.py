"""Shared fixtures: ``no_leaks`` checks that a test leaves no worker process and no
/dev/shm entry behind (a shared-memory segment, a named semaphore, multiprocessing's arena
file, anything) that it or a process it started created."""
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
from tests.helpers import alive, descendants, kill_all, shm_entries, shm_holders

LEAK_POLL_S = 0.02  # how often check() looks again while it waits
# multiprocessing.heap's arena files: pym-<pid of the process that made it>-<random>.
ARENA_PREFIX = "pym-"
# Names only a test process makes (a SharedMemory segment, a named semaphore, glibc's
# temporary name of one being made, the leak watch's own tests' files): made anywhere but
# here, they are another test's.
OTHERS_NAMES = ("psm_", "sem.", "leakwatch-")


class LeakWatch:
    """Watches /dev/shm and the processes a test starts.

    Every /dev/shm entry that appears while it watches and is still there at the end counts
    (a segment ``psm_*``, a named semaphore ``sem.mp-*`` under spawn/forkserver,
    multiprocessing.heap's arena file ``pym-<pid>-*`` that a gymnasium AsyncVectorEnv
    creates, anything), whichever process made it: this one, a worker, or a process a worker
    started. Other processes share /dev/shm (the other tests of an xdist run, anything else
    on the machine): an entry that a live process outside this one's family (itself and its
    descendants) holds open or mapped is theirs and does not count; every other new entry
    does (a stranger's entry whose creator died while this test ran would count too: a leak
    all the same).

    ``created``: the names created in this process while it watches (SharedMemory and
    SemLock are patched to record them); ``pids``: the processes it started
    (multiprocessing's), in start order."""

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
        """The names created in this process (``created``) that exist in /dev/shm now."""
        return (shm_entries() - self.before) & self.created

    def left(self) -> set:
        """Every new /dev/shm entry that counts (see the class): a segment or a semaphore
        this process created (no worker creates one: a ``psm_*`` or ``sem.mp-*`` name made
        elsewhere is another test's, from another xdist worker or a script it runs, whose
        clean-up may lag); an arena file ``pym-<pid>-*`` of this process or one it started;
        any other new entry not held by a process outside this one's family."""
        new = shm_entries() - self.before
        family = {os.getpid()} | set(self.pids) | set(descendants(os.getpid()))
        counted = new & self.created
        for n in new - self.created:
            if n.startswith(ARENA_PREFIX):
                if int(n.split("-")[1]) in family:
                    counted.add(n)
            elif not n.startswith(OTHERS_NAMES):
                counted.add(n)
        theirs = {n for n, pids in shm_holders(counted - self.created).items()
                  if pids and not pids & family}
        return counted - theirs

    def alive(self) -> list:
        """The recorded processes that are still alive (zombies are not)."""
        return [p for p in self.pids if alive(p)]

    def check(self, wait_s: float = 5.0, started: bool = False) -> None:
        """Raise AssertionError if a child process or a recorded process is alive, or an
        entry is left in /dev/shm (:meth:`left`), after up to ``wait_s`` s (and a garbage
        collection). ``started``: also fail unless the watch saw a name created and a
        process started (the test meant to watch a sampler with workers)."""
        gc.collect()
        if started:
            assert self.created, "the watch saw no shared-memory segment being created"
            assert self.pids, "the watch saw no worker process being started"
        deadline = time.monotonic() + wait_s
        while ((mp.active_children() or self.alive() or self.left())
               and time.monotonic() < deadline):
            time.sleep(LEAK_POLL_S)
        children = mp.active_children()
        assert not children, f"child processes still alive after the test: {children}"
        running = self.alive()
        assert not running, f"processes started by the test still alive: {running}"
        leaked = self.left()
        semaphores = sorted(n for n in leaked if n.startswith("sem."))
        elsewhere = sorted(leaked - self.created)
        assert not leaked, (f"left in /dev/shm after the test: {sorted(leaked)}"
                            + (f" ({len(semaphores)} named semaphores)" if semaphores else "")
                            + (f"; not created in the test's own process: {elsewhere}"
                               if elsewhere else ""))

    def assert_clean(self) -> None:
        """Nothing the sampler created is left, right now (no waiting): call after
        dropping the sampler and the exception (a sampler's names are unlinked once its
        workers are ready, or when it closes)."""
        self.check(wait_s=0, started=True)


@pytest.fixture
def no_leaks(monkeypatch):
    """After the test: no live child process or process the test started, and no /dev/shm
    entry that appeared during the test is left, unless a process outside the test's
    family holds it (:class:`LeakWatch`). Yields the watch, whose ``created``, ``pids``,
    ``present()``, ``left()``, ``alive()`` and ``assert_clean()`` a test may use earlier.
    Whatever the outcome, a recorded process still alive is SIGKILLed (no orphan outlives a
    test)."""
    watch = LeakWatch().record(monkeypatch)
    try:
        yield watch
        watch.check()
    finally:
        kill_all(watch.pids)


# SAMPLING_TEST_DEFAULT_METHOD (tox's py313 env sets "forkserver", Python 3.14's default on
# Linux): the start method of every sampler that does not name one, for the whole session.
DEFAULT_METHOD_VARIABLE = "SAMPLING_TEST_DEFAULT_METHOD"


def pytest_configure(config):
    method = os.environ.get(DEFAULT_METHOD_VARIABLE)
    if method:
        if method not in mp.get_all_start_methods():
            raise pytest.UsageError(f"{DEFAULT_METHOD_VARIABLE}={method!r}: this platform's "
                                    f"start methods are {mp.get_all_start_methods()}")
        mp.set_start_method(method, force=True)


def pytest_report_header(config):
    from tests.helpers import METHODS_SETTING, SMOKE_METHOD
    return (f"start methods: SAMPLING_TEST_METHODS={METHODS_SETTING} (fork: one {SMOKE_METHOD} "
            f"smoke case per test); default start method: "
            f"{mp.get_start_method(allow_none=True) or 'the platform default'}")


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
