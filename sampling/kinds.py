"""The kinds of sampler: each is a row of :data:`KINDS` naming the driver that runs it.

Imports only the standard library and errors. Rows are checked when this module loads: a row that
no driver can run is an import-time error, not a sampler that hangs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import warn

__all__ = ["Kind", "KINDS", "DRIVERS", "split", "usable_cpus", "worker_count"]

# How a batch is driven:
#   in_process     the envs and the agent run in this process (no workers);
#   worker_agents  each worker steps its envs with its own copy of the agent;
#   served         workers step the envs; this process computes every action (the action
#                  server), for ``groups`` groups of workers in turn.
DRIVERS = ("in_process", "worker_agents", "served")


@dataclass(frozen=True)
class Kind:
    """How a kind runs: its driver and, for the served driver, its groups of workers."""

    driver: str
    groups: int = 1        # worker groups served in turn (served only)
    overlap: bool = False  # a group steps while the parent acts for the next (served only)

    def __post_init__(self):
        if self.driver not in DRIVERS:
            raise ValueError(f"unknown driver {self.driver!r}; drivers: {', '.join(DRIVERS)}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {self.groups!r}")
        if self.driver != "served" and (self.groups != 1 or self.overlap):
            raise ValueError(f"the {self.driver} driver has one group and no overlap")
        if self.driver == "served" and not self.overlap and self.groups < 2:
            # The parent would release a group only after the next group's observations
            # came in: with one group, that is its own next step, which never comes.
            raise ValueError("the served driver without overlap needs groups >= 2")

    @property
    def workers(self) -> bool:
        """Whether envs step in worker processes."""
        return self.driver != "in_process"

    @property
    def served(self) -> bool:
        """Whether this process runs the agent for the workers' envs."""
        return self.driver == "served"


KINDS = {
    "serial": Kind("in_process"),
    "cpu": Kind("worker_agents"),
    "gpu": Kind("served", groups=1, overlap=True),
    "alternating": Kind("served", groups=2, overlap=True),
    "no_overlap_alternating": Kind("served", groups=2, overlap=False),
}


def usable_cpus() -> int:
    """CPUs this process may run on (respects affinity masks, e.g. on HPC nodes)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def split(n: int, parts: int) -> list:
    """``[(lo, hi)]`` for ``parts`` contiguous slices of ``range(n)``, extras to the first."""
    base, extra = divmod(n, parts)
    bounds = [i * base + min(i, extra) for i in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def worker_count(kind: str, batch_B: int, n_workers: int | None, width: int = 1) -> int:
    """The workers ``kind`` runs ``batch_B`` envs on: ``n_workers``, or by default one per
    usable CPU rounded down to a multiple of the kind's groups; never more than the envs
    (with a warning if asked for more). Raises ValueError where the groups cannot be equal.
    With vector envs of ``width`` sub-envs, a worker's share is whole vector envs: the
    count is over ``batch_B // width`` of them."""
    k = KINDS[kind]
    if not k.workers:
        return 0
    g, units = k.groups, batch_B // width
    envs = (f"batch_B={batch_B}" if width == 1 else
            f"the {units} vector env{'s' if units != 1 else ''} (batch_B={batch_B} / "
            f"num_envs={width})")
    if units < g:
        raise ValueError(f"{kind!r} needs {g} groups of workers, each with at least one env to "
                         f"step, and {envs} cannot make {g}: use batch_B >= {g * width}, or "
                         f"the 'gpu' kind (one group)")
    n = n_workers
    if n is None:  # one per usable CPU, a multiple of the groups
        n = max(g, min(units, usable_cpus()) // g * g)
    if n > units:
        if n_workers is not None:
            warn(f"n_workers={n} > {envs}: using {units} workers (one "
                 f"{'env' if width == 1 else 'vector env'} each); the others would have "
                 f"nothing to step")
        n = units - units % g
    if g > 1:
        equal = "two equal groups" if g == 2 else f"{g} equal groups"
        if n < g or n % g:
            count = "an even number" if g == 2 else f"a number divisible by {g}"
            raise ValueError(f"{kind!r} needs {count} of workers ({equal}), got n_workers={n}; "
                             f"use such an n_workers <= {units if width == 1 else envs}")
        sl, k = split(units, n), n // g  # group i: workers i * k .. (i + 1) * k - 1
        sizes = [(sl[(i + 1) * k - 1][1] - sl[i * k][0]) * width for i in range(g)]
        if len(set(sizes)) > 1:
            per = "n_workers" if width == 1 else "n_workers * num_envs"
            raise ValueError(f"{kind!r} splits the envs into {equal}: batch_B={batch_B} over "
                             f"n_workers={n} gives groups of {tuple(sizes)} envs; choose "
                             f"batch_B divisible by {per} (e.g. batch_B="
                             f"{n * max(1, units // n) * width})")
    return n

