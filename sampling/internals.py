"""Every private CPython name the package uses, in one place, each with a public fallback.

Imports only the standard library. What for: a segment whose views outlive the
``SharedMemory`` object, attached without the resource tracker (3.13's ``track=False`` does
that publicly), and semaphore names unlinked as soon as every process has opened them.
:func:`missing` lists what this interpreter lacks of them; the suite calls it, so that a
CPython change shows up as one clear test failure (the fallbacks keep the package working,
at the cost the fallback names).
"""
from __future__ import annotations

import glob
import mmap
import os
import sys
from contextlib import suppress
from multiprocessing import resource_tracker, shared_memory, synchronize, util
from typing import Any

__all__ = ["attach_untracked", "segment_fd", "take_mapping", "drop_semaphore_name",
           "semaphore_name", "remove_arena_files", "missing"]

SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux (shm_open's tmpfs)


def attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach the segment ``name`` without registering it with the resource tracker: the
    creator owns it, and a registration after the creator unlinked it makes the tracker
    warn at exit."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def segment_fd(shm: shared_memory.SharedMemory) -> int:
    """A new file descriptor of the segment, which the caller closes. Fallback: open it by
    name (Linux keeps POSIX shared memory in SHM_DIR)."""
    fd = getattr(shm, "_fd", None)
    if isinstance(fd, int) and fd >= 0:
        return os.dup(fd)
    return os.open(os.path.join(SHM_DIR, shm.name.lstrip("/")), os.O_RDWR)


def take_mapping(shm: shared_memory.SharedMemory) -> mmap.mmap:
    """The segment's mapping, taken away from ``shm`` (whose ``close()`` would unmap it under
    views handed to the user); ``shm.close()`` then only closes its descriptor. Views keep
    the mmap object as their base: it is unmapped when the last view dies, and (unlike a
    memoryview) it is not a container that a garbage collection could release while views
    live. Fallback: a second mapping of the same pages."""
    mapping, view = getattr(shm, "_mmap", None), getattr(shm, "_buf", None)
    if isinstance(mapping, mmap.mmap) and isinstance(view, memoryview):
        view.release()
        shm._buf = shm._mmap = None
        return mapping
    fd = segment_fd(shm)
    try:
        return mmap.mmap(fd, shm.size)
    finally:
        os.close(fd)


def semaphore_name(sem: Any) -> str | None:
    """The name of a multiprocessing semaphore (None for fork's, which have none)."""
    return getattr(getattr(sem, "_semlock", None), "name", None)


def drop_semaphore_name(sem: Any) -> bool:
    """Unlink a named semaphore's name now; processes that opened it keep using it. Returns
    whether it did (False: the name stays until the exit-time cleanup unlinks it).

    CPython registers ``util.Finalize(sem, SemLock._cleanup, (name,))`` for every named
    semaphore (3.9-3.13): running it unlinks the name, unregisters it from the resource
    tracker and takes it off the exit-time registry, so nothing runs twice."""
    name = semaphore_name(sem)
    registry = getattr(util, "_finalizer_registry", None)
    cleanup = getattr(synchronize.SemLock, "_cleanup", None)
    if not name or registry is None or cleanup is None:
        return False
    for fin in list(registry.values()):
        if getattr(fin, "_callback", None) is cleanup and getattr(fin, "_args", None) == (name,):
            with suppress(Exception):  # already unlinked by someone else: nothing left to drop
                fin()
            return True
    return False


# multiprocessing.heap names its arena files SHM_DIR/pym-<pid>-<random> (tempfile.mkstemp)
# and unlinks them at once; a process stopped in between (an env building an
# AsyncVectorEnv's shared memory when its worker is SIGTERMed) leaves one behind.
def remove_arena_files(pid: int) -> None:
    """Remove the arena files a process that is gone left in SHM_DIR (none, unless it was
    stopped between multiprocessing.heap's create and unlink)."""
    for path in glob.glob(os.path.join(SHM_DIR, f"pym-{pid}-*")):  # [] if SHM_DIR is unreadable
        with suppress(OSError):
            os.unlink(path)


def missing() -> list:
    """The private names used above that this interpreter lacks (each would fall back).
    Makes and removes one tiny segment and one named semaphore to look."""
    import multiprocessing as mp
    out = [f"multiprocessing.{name}" for name, ok in (
        ("util._finalizer_registry", hasattr(util, "_finalizer_registry")),
        ("synchronize.SemLock._cleanup", hasattr(synchronize.SemLock, "_cleanup")))
        if not ok]
    shm = shared_memory.SharedMemory(create=True, size=mmap.PAGESIZE)
    try:
        out += [f"SharedMemory.{a}" for a in ("_fd", "_mmap", "_buf") if not hasattr(shm, a)]
    finally:
        shm.close()
        shm.unlink()
    if "spawn" in mp.get_all_start_methods():
        sem = mp.get_context("spawn").Semaphore(0)
        if not semaphore_name(sem):
            out.append("SemLock._semlock.name")
        elif not drop_semaphore_name(sem):
            out.append("the semaphore's util.Finalize(SemLock._cleanup)")
    return out
