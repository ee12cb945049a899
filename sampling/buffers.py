"""Nested numpy arrays, optionally laid out in one shared-memory segment.

Imports numpy, the standard library, errors, internals and tree. A *spec* is a tree whose leaves
are :class:`Spec`; :func:`layout` turns it into offsets, and every process
builds identical views from the same layout, so a batch is one contiguous segment
that crosses processes without copying. Only the creating process unlinks.
"""
from __future__ import annotations

import errno
import mmap
import os
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from .errors import SharedMemoryFullError
from .internals import SHM_DIR, attach_untracked, segment_fd, take_mapping
from .tree import tree_map

_ALIGN = 64  # cache line: workers writing neighbouring fields never share one


def cast_problem(a: np.ndarray, dtype: np.dtype) -> str | None:
    """Why storing ``a`` in an array of ``dtype`` would change its values; None if it would
    not. One rule for every value the sampler stores: the same kind of number (a float is
    never stored as an int), integers only within the range of ``dtype``, strings only up to
    its length."""
    src = a.dtype
    if src == dtype:
        return None
    if src.kind == "O":
        return ("an integer beyond int64" if a.size and isinstance(a.flat[0], int)
                else "not a number")
    if src.kind in "biu" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if a.size and (a.min() < info.min or a.max() > info.max):
            return (f"values {a.min()}..{a.max()} outside the range of {dtype} "
                    f"({info.min}..{info.max})")
        return None
    if src.kind in "US" and dtype.kind == src.kind:
        chars = dtype.itemsize // np.dtype(dtype.kind + "1").itemsize
        if a.size and int(np.char.str_len(a).max()) > chars:
            return (f"a string longer than {chars} characters (the longest the first call "
                    f"gave, which sized the buffer)")
        return None
    if not np.can_cast(src, dtype, "same_kind"):
        return f"dtype {src}, which cannot be stored as {dtype} without changing its values"
    if src.kind == dtype.kind == "f" and dtype.itemsize < src.itemsize and a.size:
        top, limit = np.abs(a[np.isfinite(a)], dtype=np.float64), float(np.finfo(dtype).max)
        if top.size and top.max() > limit:
            return (f"a value of magnitude {top.max():g}, beyond the range of {dtype} "
                    f"(±{limit:g}): it would be stored as inf")
    return None


@dataclass(frozen=True)
class Spec:
    """One array of a layout: its (viewed) shape and dtype; ``env_major``: stored with its
    first two axes swapped (see :func:`layout`)."""

    shape: tuple
    dtype: str
    env_major: bool = False


@dataclass(frozen=True)
class Placed:
    """A :class:`Spec` at a byte offset of the segment."""

    offset: int
    shape: tuple
    dtype: str
    env_major: bool


def spec_of(example: Any, lead: tuple = (), env_major: bool = False) -> Any:
    """Spec of arrays shaped ``lead + example.shape`` with the example's dtype.

    ``env_major`` (for ``lead = (T, B)``): store each array as ``[B, T, ...]`` and view it
    as ``[T, B, ...]``; see :func:`layout`.
    """
    def leaf(x):
        a = np.asarray(x)
        return Spec(tuple(lead) + a.shape, a.dtype.str, env_major)
    return tree_map(leaf, example)


def layout(specs: dict) -> tuple:
    """Return ``(nbytes, placed)``: ``placed`` mirrors ``specs`` (a tree of :class:`Spec`)
    with :class:`Placed` leaves.

    Batches are ``[T, B]``, but each worker writes the columns of its own envs at every
    step: stored time-major, a row of a small field (rewards, done flags) shares one cache
    line between workers, which then bounce it between cores at every step. Stored
    env-major, each worker's envs are contiguous.
    """
    offset = 0

    def place(leaf: Spec) -> Placed:
        nonlocal offset
        dtype = np.dtype(leaf.dtype)
        start = offset
        offset += -(-int(np.prod(leaf.shape, dtype=np.int64)) * dtype.itemsize // _ALIGN) * _ALIGN
        return Placed(start, tuple(leaf.shape), dtype.str, bool(leaf.env_major))

    placed = tree_map(place, specs) if specs else {}
    return max(offset, _ALIGN), placed


def views(buf: Any, placed: dict) -> dict:
    """Arrays over ``buf`` (any writable buffer) at the offsets of ``placed``."""
    def view(p: Placed) -> np.ndarray:
        stored = (p.shape[1], p.shape[0]) + p.shape[2:] if p.env_major else p.shape
        a = np.ndarray(stored, np.dtype(p.dtype), buffer=buf, offset=p.offset)
        return a.swapaxes(0, 1) if p.env_major else a
    return tree_map(view, placed)


class SharedBuffer:
    """One shared-memory segment holding a layout.

    The creator calls :meth:`unlink` as soon as every worker has attached: the name
    disappears from ``/dev/shm`` while the mapping lives on in each process until
    its last view is garbage collected, so nothing can leak past that point.
    """

    def __init__(self, nbytes: int, name: Any = None, what: str = "the segment",
                 keep_fd: bool = False):
        self.owner = name is None
        self.reserved = False  # the creator's segment has its pages allocated (see reserve)
        self.fd: int | None = None
        if isinstance(name, SegmentFd):  # a worker started after the name was unlinked
            self.owner, self.name, self.nbytes, self._shm = False, None, nbytes, None
            try:
                self.buf = mmap.mmap(name.fd, nbytes)
            finally:
                os.close(name.fd)
            return
        if self.owner:
            shm, fd, self.reserved = _create(nbytes, what)
        else:
            shm, fd = attach_untracked(name), None
        self.name = shm.name
        self.nbytes = nbytes
        self._shm = shm
        if keep_fd:  # to start workers later, once the name is gone (see SegmentFd)
            self.fd, fd = fd, None
        if fd is not None:
            os.close(fd)
        self.buf = take_mapping(shm)
        shm.close()  # only closes its file descriptor now

    def close_fd(self) -> None:
        """Close the descriptor kept for later workers (idempotent)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def unlink(self) -> None:
        """Remove the name (creator only; idempotent)."""
        if self.owner and self._shm is not None:
            shm, self._shm = self._shm, None
            with suppress(FileNotFoundError):
                shm.unlink()


class SegmentFd:
    """A segment's file descriptor for a worker started after its name was unlinked (a
    restarted worker): inherited as is by a forked child, passed by multiprocessing to a
    spawned or forkserver one (``reduction.DupFd``, as it passes a Connection's)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction
        return _rebuild_segment_fd, (reduction.DupFd(self.fd),)


def _rebuild_segment_fd(dup: Any) -> SegmentFd:
    return SegmentFd(dup.detach())


def _create(nbytes: int, what: str) -> tuple:
    """``(segment, a descriptor of it, reserved)``: a new segment of ``nbytes``, its memory
    reserved up front where the platform can; ``what`` (its contents) goes into the errors."""
    try:
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
    except (MemoryError, OSError) as e:
        # ENOMEM: mmap under RLIMIT_AS or memory overcommit limits
        if isinstance(e, MemoryError) or e.errno == errno.ENOMEM:
            raise MemoryError(no_memory_message("shared-memory segment", nbytes, what)) from e
        if e.errno == errno.ENOSPC:
            raise SharedMemoryFullError(shm_full_message(nbytes, what), nbytes) from e
        raise
    fd = None
    try:
        fd = segment_fd(shm)
        reserved = reserve(fd, nbytes, what)
    except BaseException:
        if fd is not None:
            os.close(fd)
        shm.close()
        with suppress(FileNotFoundError):
            shm.unlink()
        raise
    return shm, fd, reserved


def reserve(fd: int, nbytes: int, what: str) -> bool:
    """Allocate the segment's pages now (``posix_fallocate``), where the platform can;
    return whether it could.

    A segment is a sparse file in a tmpfs (/dev/shm): creating it succeeds whatever its
    size, and a page that finds the tmpfs full when first touched kills the toucher with
    SIGBUS, a worker or the parent alike, with no Python exception. Docker gives /dev/shm
    64 MB unless told otherwise. Reserving turns that into an error here, before any
    process starts."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None or nbytes <= 0:
        return False
    try:
        fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG):
            raise SharedMemoryFullError(shm_full_message(nbytes, what), nbytes) from e
        if e.errno == errno.ENOMEM:
            raise MemoryError(no_memory_message("shared-memory segment", nbytes, what)) from e
        return False  # EOPNOTSUPP, EINVAL...: this filesystem cannot; pages come when touched
    return True


def shm_space() -> tuple | None:
    """``(free, total)`` bytes of /dev/shm, or None where it cannot be read."""
    try:
        st = os.statvfs(SHM_DIR)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def size_text(n: int) -> str:
    """``n`` bytes for people: "1.5 GB (1610612736 bytes)"."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def shm_full_message(nbytes: int, what: str) -> str:
    space = shm_space()
    free = (f"{SHM_DIR} has {size_text(space[0])} free of {size_text(space[1])}"
            if space else f"{SHM_DIR} is too small")
    return (f"cannot reserve {size_text(nbytes)} of shared memory for {what}: {free}. "
            f"Docker gives /dev/shm 64 MB unless you pass --shm-size (e.g. `docker run "
            f"--shm-size=8g`; in Kubernetes mount an emptyDir with medium: Memory at "
            f"/dev/shm); or make the batch smaller (batch_T, batch_B, eval_n_envs)")


def no_memory_message(kind: str, nbytes: int, what: str) -> str:
    return (f"out of memory allocating the sampler's {kind} of {size_text(nbytes)} for "
            f"{what}; check the process's memory limits (ulimit -v, a cgroup or the job "
            f"scheduler's memory request), or make the batch smaller (batch_T, batch_B, "
            f"eval_n_envs)")
