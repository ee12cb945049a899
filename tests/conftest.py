"""Shared fixtures: ``no_leaks`` checks that a test leaves no worker process and no
/dev/shm entry (shared-memory segment or named semaphore) that it created."""
from __future__ import annotations

import gc
import multiprocessing as mp
import multiprocessing.shared_memory
import multiprocessing.synchronize
import time

import pytest

from tests.helpers import shm_entries


@pytest.fixture
def no_leaks(monkeypatch):
    """After the test: no live child process, and none of the /dev/shm names this process
    created during the test is left (other processes may share /dev/shm, so only our own
    names count)."""
    created: set = set()
    shm_init = mp.shared_memory.SharedMemory.__init__
    sem_init = mp.synchronize.SemLock.__init__

    def shm_init_rec(self, name=None, create=False, size=0, *args, **kwargs):
        shm_init(self, name, create, size, *args, **kwargs)
        if create:
            created.add(self.name.lstrip("/"))

    def sem_init_rec(self, *args, **kwargs):
        sem_init(self, *args, **kwargs)
        name = self._semlock.name  # None where it is unlinked at once (fork)
        if name:
            created.add("sem." + name.lstrip("/"))

    monkeypatch.setattr(mp.shared_memory.SharedMemory, "__init__", shm_init_rec)
    monkeypatch.setattr(mp.synchronize.SemLock, "__init__", sem_init_rec)
    before = shm_entries()
    yield
    gc.collect()
    deadline = time.monotonic() + 5.0
    while mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    children = mp.active_children()
    assert not children, f"child processes still alive after the test: {children}"
    leaked = (shm_entries() - before) & created
    assert not leaked, f"left in /dev/shm after the test: {sorted(leaked)}"
