"""Exceptions raised by samplers, and the carrier of a worker's remote traceback.

Imports nothing from the package. The error model follows CPython's
``concurrent.futures.process``: the worker formats its traceback, the parent
raises a :class:`WorkerError` whose ``__cause__`` is the original exception with
the remote traceback attached.
"""
from __future__ import annotations

import errno
from typing import Any, Callable

__all__ = ["SamplerError", "WorkerError", "SamplerClosedError", "RemoteTraceback",
           "SharedMemoryFullError"]


class SamplerError(RuntimeError):
    """Base class of every error a sampler raises at run time."""


class SamplerClosedError(SamplerError):
    """The sampler was shut down (normally or after a failure) and cannot be used."""


class SharedMemoryFullError(SamplerError, OSError):
    """/dev/shm has no room for the sampler's shared-memory segment (an ``OSError`` with
    ``errno.ENOSPC`` too). Attribute: ``nbytes``, the segment's size."""

    def __init__(self, message: str, nbytes: int = 0):
        super().__init__(message)
        self.errno = errno.ENOSPC
        self.strerror = message
        self.nbytes = nbytes

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return (type(self), (self.strerror, self.nbytes))


class RemoteTraceback(Exception):
    """Holds the formatted traceback of an exception raised in a worker process."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class WorkerError(SamplerError):
    """A worker process raised or died.

    Attributes: ``worker`` (index), ``envs`` (global env indices it ran),
    ``exitcode`` (None while it was alive), ``remote_traceback`` (text or None).
    """

    def __init__(self, message: str, worker: int, envs: list, exitcode=None, remote_traceback=None):
        super().__init__(message)
        self.worker = worker
        self.envs = envs
        self.exitcode = exitcode
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return (type(self), (self.args[0], self.worker, self.envs, self.exitcode,
                             self.remote_traceback))


def tag(e: BaseException, where: str) -> None:
    """Record where an exception happened (kept through pickling, shown by the parent)."""
    if getattr(e, "sampling_where", None) is None:
        try:
            e.sampling_where = where
        except AttributeError:  # exceptions with __slots__
            pass


def tagged(fn: Callable[..., Any], where: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)``; tag any exception with ``where``."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        tag(e, where)
        raise
