"""Exceptions, the words every message is built from, and how closing paths stay quiet.

Imports nothing from the package. The error model follows CPython's
``concurrent.futures.process``: the worker formats its traceback, the parent
raises a :class:`WorkerError` whose ``__cause__`` is the original exception with
the remote traceback attached. An exception from user code (an env, the agent) is tagged
with where it happened (:func:`tag`); every kind shows that place to the user.
"""
from __future__ import annotations

import errno
import inspect
import logging
import os
import warnings
from contextlib import suppress
from typing import Any, Callable

log = logging.getLogger(__name__)

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
        super().__init__(tb)  # its str()
        self.tb = tb


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
    """Record where an exception happened (kept through pickling; :func:`locate` and the
    pool's WorkerError show it)."""
    if getattr(e, "sampling_where", None) is None:
        with suppress(AttributeError):  # exceptions with __slots__
            e.sampling_where = where


def where_text(e: BaseException) -> str:
    """`` (in <where>)`` for a tagged exception whose message does not say it already (the
    sampler's own checks name the env and the step themselves)."""
    where, text = getattr(e, "sampling_where", None), str(e)
    if not where or all(part in text for part in where.split(", ")):
        return ""
    return f" (in {where})"


def locate(e: BaseException) -> None:
    """Make a tagged exception raised in this process say where it happened: a note
    (3.11+), else the same text at the end of its message (once)."""
    text = where_text(e)
    if not text or getattr(e, "sampling_located", False):
        return
    try:
        e.sampling_located = True
    except AttributeError:
        return
    if hasattr(e, "add_note"):
        e.add_note(text.strip())
    elif e.args and isinstance(e.args[0], str):
        e.args = (e.args[0] + text,) + e.args[1:]


def tagged(fn: Callable[..., Any], where: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)``; tag any exception with ``where``."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        tag(e, where)
        raise


# -- the words of messages: one way to name each thing --------------------------------
def env_name(b: int, *, label: str = "env", width: int | None = None,
             where: str | None = None) -> str:
    """How messages name env ``b`` (its global index: ``env_ids``): "env 5", "eval env 9";
    a vector env of ``width`` sub-envs from b: "envs 4..7 (one vector env)"; ``where`` (who
    steps it) is added in the parentheses: "env 5 (worker 0)"."""
    name = f"{label} {b}" if width in (None, 1) else f"{label}s {b}..{b + width - 1}"
    notes = ["one vector env"] if width is not None else []
    if where:
        notes.append(where)
    return name + (f" ({', '.join(notes)})" if notes else "")


def describe(x: Any, arrays: bool = True) -> str:
    """A value as messages show what was found: an array's shape and dtype (with
    ``arrays``), a tuple's items' types, or its type."""
    if arrays and hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    if isinstance(x, tuple):
        return f"a tuple of {len(x)} ({', '.join(type(v).__name__ for v in x)})"
    return f"a {type(x).__name__}"


def missing_entry(who: str, field: str, when: str, first: str = "the probe step") -> str:
    """The message for an entry (of an info or agent_info dict) that came once and not now."""
    return (f"{who} returned no {field} at {when}; it had it on {first}, and a batch cannot "
            f"tell a missing entry from 0. Report the entry at every step (e.g. a wrapper "
            f"that fills in a default)")


def not_a_dict(who: str, field: str, x: Any, when: str) -> str:
    """The message for an info (or agent_info) that is not a dict."""
    return (f"{who} returned {field} of type {type(x).__name__} at {when}; it must be a dict "
            f"(the gymnasium API's info is one)")


def needs_workers(option: str, kind: str, off: str) -> str:
    """The message for an option that only worker processes can honour."""
    return (f"{option} needs worker processes: the {kind} kind steps envs in this process, "
            f"which cannot {'stop itself' if option == 'step_timeout' else 'survive a failure'}"
            f"; use a parallel kind ('cpu', 'gpu', ...) or {off}")


# -- closing paths and warnings ---------------------------------------------------------
def quietly(fn: Callable[[], Any]) -> None:
    """Call ``fn()``; log (at debug level) and ignore its errors (closing paths: a failing
    close must not hide the error that led there, nor keep other things open)."""
    try:
        fn()
    except Exception:
        log.debug("ignored an error while closing", exc_info=True)


def close_all(envs: list) -> None:
    """Close every env in ``envs`` once (each taken off the list first), ignoring errors;
    duck-typed envs may have no ``close``."""
    while envs:
        close = getattr(envs.pop(0), "close", None)
        if close is not None:
            quietly(close)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` pointing at the first frame outside this package (the caller's
    line, however deep in the package the warning is found)."""
    level, frame = 1, inspect.currentframe()
    while frame is not None and _in_package(frame.f_code.co_filename):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


def _in_package(filename: str) -> bool:
    folder = os.path.dirname(os.path.abspath(filename))
    return folder == _PACKAGE_DIR or folder.startswith(_PACKAGE_DIR + os.sep)
