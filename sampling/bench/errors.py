"""The benchmark's one exception (a module of its own, so that every other imports it)."""


class BenchError(Exception):
    """A benchmark input is unusable (bad --env, missing torch, ...); the message says why."""
