"""Nested numpy arrays, optionally laid out in one shared-memory segment.

Imports only numpy and the standard library. A *spec* is a nested dict whose leaves
are ``(shape, dtype_str)``; :func:`layout` turns it into offsets, and every process
builds identical views from the same layout, so a batch is one contiguous segment
that crosses processes without copying. Only the creating process unlinks.
"""
from __future__ import annotations

import sys
from multiprocessing import shared_memory
from typing import Any, Callable, Iterator

import numpy as np

_ALIGN = 64  # cache line: workers writing neighbouring fields never share one


def is_tree(x: Any) -> bool:
    return isinstance(x, dict)


def tree_map(fn: Callable, tree: Any) -> Any:
    """Apply ``fn`` to every leaf of a nested dict."""
    if is_tree(tree):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def tree_leaves(tree: Any, path: tuple = ()) -> Iterator[tuple]:
    """Yield ``(path, leaf)`` for every leaf, in insertion order."""
    if is_tree(tree):
        for k, v in tree.items():
            yield from tree_leaves(v, path + (k,))
    else:
        yield path, tree


def spec_of(example: Any, lead: tuple = (), env_major: bool = False) -> Any:
    """Spec of arrays shaped ``lead + example.shape`` with the example's dtype.

    ``env_major`` (for ``lead = (T, B)``): store each array as ``[B, T, ...]`` and view it
    as ``[T, B, ...]``; see :func:`layout`.
    """
    if is_tree(example):
        return {k: spec_of(v, lead, env_major) for k, v in example.items()}
    a = np.asarray(example)
    return (tuple(lead) + a.shape, a.dtype.str) + ((True,) if env_major else ())


def layout(specs: dict) -> tuple:
    """Return ``(nbytes, placed)``: ``placed`` mirrors ``specs`` with ``(offset, shape, dtype,
    env_major)``.

    A leaf is ``(shape, dtype)`` or ``(shape, dtype, True)``: env-major, stored with its
    first two axes swapped. Batches are ``[T, B]``, but each worker writes the columns
    of its own envs at every step: stored time-major, a row of a small field (rewards,
    done flags) shares one cache line between workers, which then bounce it between
    cores at every step. Stored env-major, each worker's envs are contiguous.
    """
    offset = 0

    def place(leaf):
        nonlocal offset
        shape, dtype, env_major = leaf[0], np.dtype(leaf[1]), len(leaf) > 2 and leaf[2]
        start = offset
        offset += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // _ALIGN) * _ALIGN
        return (start, tuple(shape), dtype.str, bool(env_major))

    placed = tree_map(place, specs) if specs else {}
    return max(offset, _ALIGN), placed


def views(buf: Any, placed: dict) -> dict:
    """Arrays over ``buf`` (any writable buffer) at the offsets of ``placed``."""
    def view(p):
        offset, shape, dtype, env_major = p
        if not env_major:
            return np.ndarray(shape, np.dtype(dtype), buffer=buf, offset=offset)
        stored = (shape[1], shape[0]) + shape[2:]
        return np.ndarray(stored, np.dtype(dtype), buffer=buf, offset=offset).swapaxes(0, 1)
    return tree_map(view, placed)


class SharedBuffer:
    """One shared-memory segment holding a layout.

    The creator calls :meth:`unlink` as soon as every worker has attached: the name
    disappears from ``/dev/shm`` while the mapping lives on in each process until
    its last view is garbage collected, so nothing can leak past that point.
    """

    def __init__(self, nbytes: int, name: str | None = None):
        self.owner = name is None
        if self.owner:
            shm = shared_memory.SharedMemory(create=True, size=nbytes)
        else:
            shm = _attach_untracked(name)
        self.name = shm.name
        self.nbytes = nbytes
        self._shm = shm
        # Take the mapping away from the SharedMemory object, whose close() would unmap it
        # under views handed to the user. The views keep the mmap object itself as their
        # base: it is unmapped when the last view dies, and (unlike a memoryview) it is not
        # a garbage-collected container that a collection could release while views live.
        self.buf = shm._mmap
        shm._buf.release()
        shm._buf = None
        shm._mmap = None
        shm.close()  # only closes the file descriptor now

    def unlink(self) -> None:
        """Remove the name (creator only; idempotent)."""
        if self.owner and self._shm is not None:
            shm, self._shm = self._shm, None
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    # A worker must not register the segment with the resource tracker: the creator owns it,
    # and a late registration after the creator unlinked it makes the tracker warn at exit.
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    from multiprocessing import resource_tracker
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register
