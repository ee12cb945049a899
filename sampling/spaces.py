"""Minimal numpy spaces for the built-in envs, and duck-typed helpers for any space.

Imports only numpy. gymnasium spaces are read by duck typing (``n``, ``low``/``high``,
``shape``, ``dtype``, ``spaces``, ``sample()``); gymnasium is never imported.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["Box", "Discrete", "Dict", "random_action_fn", "action_pool"]


class Discrete:
    """Integers ``start .. start + n - 1`` (gymnasium-compatible subset)."""

    def __init__(self, n: int, start: int = 0, seed: int | None = None):
        self.n = int(n)
        self.start = int(start)
        self.shape: tuple = ()
        self.dtype = np.dtype(np.int64)
        self._rng = np.random.default_rng(seed)

    def seed(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def sample(self) -> np.int64:
        return np.int64(self.start + self._rng.integers(self.n))

    def contains(self, x: Any) -> bool:
        try:
            v = int(x)
        except (TypeError, ValueError):
            return False
        return v == x and self.start <= v < self.start + self.n

    def __repr__(self) -> str:
        start = f", start={self.start}" if self.start else ""
        return f"Discrete({self.n}{start})"


class Box:
    """A box in R^n (gymnasium-compatible subset)."""

    def __init__(self, low, high, shape: tuple | None = None, dtype=np.float32,
                 seed: int | None = None):
        self.dtype = np.dtype(dtype)
        if shape is None:
            shape = np.shape(low)
        self.shape = tuple(shape)
        self.low = np.broadcast_to(np.asarray(low, self.dtype), self.shape).copy()
        self.high = np.broadcast_to(np.asarray(high, self.dtype), self.shape).copy()
        self._rng = np.random.default_rng(seed)

    def seed(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def sample(self) -> np.ndarray:
        return _uniform(self._rng, self.low, self.high, (), self.dtype)

    def contains(self, x: Any) -> bool:
        x = np.asarray(x)
        return x.shape == self.shape and bool(np.all(x >= self.low) and np.all(x <= self.high))

    def __repr__(self) -> str:
        return f"Box({self.shape}, {self.dtype})"


class Dict:
    """A dict of spaces (gymnasium-compatible subset)."""

    def __init__(self, spaces: dict):
        self.spaces = dict(spaces)
        self.shape = None
        self.dtype = None

    def seed(self, seed: int | None = None) -> None:
        for i, s in enumerate(self.spaces.values()):
            s.seed(None if seed is None else seed + i)

    def sample(self) -> dict:
        return {k: s.sample() for k, s in self.spaces.items()}

    def __repr__(self) -> str:
        return f"Dict({self.spaces!r})"


def _uniform(rng, low, high, size, dtype):
    # Unbounded boxes sample a standard normal, like gymnasium.
    low_f = np.where(np.isfinite(low), low, -1.0).astype(np.float64)
    high_f = np.where(np.isfinite(high), high, 1.0).astype(np.float64)
    if np.issubdtype(dtype, np.integer):
        x = rng.integers(low_f, high_f + 1, size=tuple(size) + np.shape(low))
    else:
        x = rng.uniform(low_f, high_f, size=tuple(size) + np.shape(low))
    return x.astype(dtype)


def random_action_fn(space: Any, rng: np.random.Generator) -> Callable[[int], Any]:
    """Return ``f(n) -> [n, ...]`` random actions for ``space``, drawn from ``rng``.

    Vectorized for Discrete-, MultiBinary-, Box- and MultiDiscrete-like spaces; others fall
    back to ``space.sample()`` (after ``space.seed`` with a draw from ``rng``).
    """
    shape = tuple(getattr(space, "shape", None) or ())
    if hasattr(space, "n") and not hasattr(space, "nvec") and shape:
        # MultiBinary(n): ``n`` is the shape of a 0/1 vector, not a count of choices.
        dtype = np.dtype(space.dtype)
        return lambda k: rng.integers(0, 2, size=(k,) + shape).astype(dtype, copy=False)
    if hasattr(space, "n") and not hasattr(space, "nvec"):
        n_, start, dtype = int(space.n), int(getattr(space, "start", 0)), np.dtype(space.dtype)
        return lambda k: (start + rng.integers(n_, size=k)).astype(dtype, copy=False)
    if hasattr(space, "nvec"):
        nvec, dtype = np.asarray(space.nvec), np.dtype(space.dtype)
        start = np.asarray(getattr(space, "start", 0))
        return lambda k: (start + rng.integers(nvec, size=(k,) + nvec.shape)).astype(dtype)
    if hasattr(space, "low") and hasattr(space, "high"):
        low, high, dtype = np.asarray(space.low), np.asarray(space.high), np.dtype(space.dtype)
        return lambda k: _uniform(rng, low, high, (k,), dtype)
    if hasattr(space, "seed"):
        space.seed(int(rng.integers(2**31)))

    def sample(k):
        xs = [space.sample() for _ in range(k)]
        if isinstance(xs[0], dict):
            return {key: np.stack([x[key] for x in xs]) for key in xs[0]}
        return np.stack([np.asarray(x) for x in xs])
    return sample


def action_pool(space: Any, n: int, seed: int) -> list:
    """``n`` random actions in the form the collector passes to ``env.step`` (Python ints
    for discrete spaces)."""
    a = random_action_fn(space, np.random.default_rng(seed))(n)
    if isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.kind in "iub":
        return a.tolist()
    if isinstance(a, dict):
        return [{k: v[i] for k, v in a.items()} for i in range(n)]
    return list(a)
