"""Many copies of a training script (ranks), one sampler each, adding up to one sampler.

Optional, like :mod:`sampling.torch_agent`: the core never imports it. Reading the
launcher's variables (:func:`launch`) needs only the standard library; the collectives
use ``torch.distributed`` (gloo on CPUs, nccl on GPUs), imported when first called, over
a process group that the caller or :func:`init` sets up. This module opens no socket
itself.

A sampler made with ``rank=r, world_size=n`` (see :func:`sampling.make_sampler`) steps
global envs ``r * batch_B`` to ``(r + 1) * batch_B - 1``, seeded as one sampler with
``n * batch_B`` envs seeds them, so the ranks' batches side by side are that sampler's
batch. The helpers below put the per-rank results back together:

* :func:`gather_traj_infos`: the episodes of all ranks (``batch.traj_infos`` or
  ``evaluate_agent()``), in the order one sampler would list them;
* :func:`mean_stats`: means of episode stats over all ranks, one small all-reduce;
* :func:`broadcast_parameters`: rank 0's parameters into every rank's agent.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["Launch", "launch", "init", "gather_traj_infos", "merge_episodes", "mean_stats",
           "broadcast_parameters"]

# Per launcher, the variables that tell a process its place: (rank, world size, local
# rank, local world size). Slurm's local size comes from SLURM_TASKS_PER_NODE instead.
_SOURCES = (
    ("torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")),
    ("mpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE")),
    ("mpi", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")),  # MPICH, Intel
    ("slurm", ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None)),
)
_LAUNCHERS = {"torchrun": "torchrun", "slurm": "srun", "mpi": "an MPI launcher"}
# torchrun sets this in every rank it starts: its variables are then the ranks' own, and
# those of an outer launcher (srun or mpirun starting one torchrun per node) describe
# torchrun itself.
_TORCHRUN_MARK = "TORCHELASTIC_RUN_ID"


@dataclass(frozen=True)
class Launch:
    """Where this process stands among the ranks its launcher started."""

    rank: int
    world_size: int
    local_rank: int = 0        # among the ranks on this node
    local_world_size: int = 1  # ranks on this node
    launcher: str = "none"     # "torchrun", "slurm", "mpi", or "none" (one process)

    def sampler_kwargs(self) -> dict:
        """``rank=`` and ``world_size=`` for :func:`sampling.make_sampler`."""
        return {"rank": self.rank, "world_size": self.world_size}

    def cpus(self, split: bool | None = None) -> list:
        """This rank's share of the CPUs this process may use (``os.sched_getaffinity``):
        with ``split``, the usable CPUs cut into ``local_world_size`` contiguous runs, one
        per local rank, so that ranks on one node do not fight over cores. ``None``: split
        unless this process is already confined to fewer CPUs than the node has, as when
        the launcher gave each rank its own (``srun --cpus-per-task``, ``mpirun
        --bind-to``, ``taskset``)."""
        usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else list(range(os.cpu_count() or 1))
        if split is None:
            split = len(usable) >= (os.cpu_count() or 1)
        if not split or self.local_world_size == 1:
            return usable
        n = len(usable)
        if n < self.local_world_size:
            raise ValueError(f"{self.local_world_size} ranks on this node cannot each have "
                             f"CPUs of their own: this process may use {n} ({usable}); "
                             f"start fewer ranks per node, or pass split=False to share them")
        a = self.local_rank * n // self.local_world_size
        b = (self.local_rank + 1) * n // self.local_world_size
        return usable[a:b]

    def cpu_affinity(self, n_workers: int, split: bool | None = None) -> list:
        """``cpu_affinity=`` for a sampler of ``n_workers`` workers on this rank's share of
        the CPUs (:meth:`cpus`): contiguous runs, one per worker, or, with fewer CPUs than
        workers, one CPU each, in turn."""
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers must be an int >= 1, got {n_workers!r}")
        cpus = self.cpus(split)
        n = len(cpus)
        if n < n_workers:
            return [[cpus[w % n]] for w in range(n_workers)]
        return [cpus[w * n // n_workers:(w + 1) * n // n_workers] for w in range(n_workers)]


def launch(environ: Mapping[str, str] | None = None) -> Launch:
    """This process's rank, world size and node-local place, read from the launcher's
    variables (torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_*``, Open MPI's
    ``OMPI_COMM_WORLD_*``, MPICH's ``PMI_*``, Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``/
    ``SLURM_LOCALID``). One process with none of them is rank 0 of 1.

    The innermost launcher wins: torchrun's variables where torchrun started this process,
    and an MPI launcher's over Slurm's (``mpirun`` in an ``sbatch`` script inherits the
    batch step's). Otherwise every launcher's must agree. ValueError, naming the
    variables, where they are not ints, are half set, out of range, or contradict."""
    env = os.environ if environ is None else environ
    found = [got for name, keys in _SOURCES if (got := _read(env, name, keys)) is not None]
    if not found:
        return Launch(0, 1)
    if _TORCHRUN_MARK in env and found[0][0].launcher == "torchrun":
        return found[0][0]
    if any(g.launcher == "mpi" for g, _ in found):  # Slurm's then describe the allocation
        found = [(g, k) for g, k in found if g.launcher != "slurm"]
    first, first_keys = found[0]
    for got, keys in found[1:]:
        if (got.rank, got.world_size) != (first.rank, first.world_size):
            raise ValueError(
                f"the launcher's variables contradict each other: "
                f"{_describe(first, first_keys)} but {_describe(got, keys)}. Unset the stale "
                f"ones (e.g. a RANK exported by hand), or pass rank= and world_size= to "
                f"make_sampler yourself")
    return first


def _int_var(env: Mapping[str, str], key: str, what: str) -> int:
    text = env[key].strip()
    if not (text.isascii() and text.isdigit()):  # int() would take "1_0", "+1", "١"
        raise ValueError(f"{key}={env[key]!r} is not a non-negative int in decimal digits "
                         f"(read as this process's {what})")
    return int(text)


def _read(env: Mapping[str, str], name: str, keys: tuple) -> tuple | None:
    """(Launch, keys) from one launcher's variables, or None where it set none."""
    rank_key, size_key, local_key, local_size_key = keys
    _pair(env, rank_key, size_key, name)
    if rank_key not in env:
        return None
    rank = _int_var(env, rank_key, f"{name} rank")
    size = _int_var(env, size_key, f"{name} world size")
    if size < 1 or rank >= size:
        raise ValueError(f"{rank_key}={rank} with {size_key}={size}: a rank must be in "
                         f"[0, {size_key}) and {size_key} >= 1")
    if local_size_key is None:  # Slurm: srun sets all three in every task
        local_size = None
        if local_key in env:
            for key in ("SLURM_TASKS_PER_NODE", "SLURM_NODEID"):
                _pair(env, local_key, key, name)
            local_size = _slurm_local_size(env)
    else:
        _pair(env, local_key, local_size_key, name)
        local_size = (_int_var(env, local_size_key, f"{name} ranks on this node")
                      if local_size_key in env else None)
    if local_size is None:  # the launcher does not say: as if alone on the node
        return Launch(rank, size, 0, 1, name), keys
    local_rank = _int_var(env, local_key, f"{name} rank on this node")
    if not 0 <= local_rank < local_size <= size:
        raise ValueError(f"{local_key}={local_rank} with {local_size} {name} ranks on this "
                         f"node and {size} in all: a local rank must be in [0, ranks on the "
                         f"node), and a node cannot hold more ranks than there are")
    return Launch(rank, size, local_rank, local_size, name), keys


def _pair(env: Mapping[str, str], a: str, b: str, name: str) -> None:
    """a and b come together, or not at all."""
    if (a in env) != (b in env):
        have, lack = (a, b) if a in env else (b, a)
        raise ValueError(f"{have} is set but {lack} is not: {_LAUNCHERS[name]} sets both; "
                         f"set the missing one or unset {have}")


def _slurm_local_size(env: Mapping[str, str]) -> int:
    """Tasks on this node: SLURM_TASKS_PER_NODE ("2(x3),1": 2 on each of 3 nodes, then 1)
    at this node's index (SLURM_NODEID)."""
    spec, node = env["SLURM_TASKS_PER_NODE"], _int_var(env, "SLURM_NODEID", "Slurm node index")
    counts = []
    for part in spec.split(","):
        n, sep, times = part.strip().partition("(x")
        if not n.isdigit() or (sep and not (times.endswith(")") and times[:-1].isdigit())):
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r} is not Slurm's form (e.g. "
                             f"'2(x3),1': 2 tasks on each of 3 nodes, then 1)")
        counts.extend([int(n)] * (int(times[:-1]) if sep else 1))
    if node >= len(counts):
        raise ValueError(f"SLURM_NODEID={node}, but SLURM_TASKS_PER_NODE={spec!r} describes "
                         f"{len(counts)} nodes")
    return counts[node]


def _describe(got: Launch, keys: tuple) -> str:
    return f"{keys[0]}={got.rank}, {keys[1]}={got.world_size} ({got.launcher})"


# -- torch.distributed ------------------------------------------------------------------
def _dist():
    try:
        import torch.distributed as dist
    except ImportError as e:
        raise ImportError("sampling.distributed's collectives need torch "
                          "(pip install sampling[torch]); launch() does not") from e
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    return dist


def init(backend: str = "gloo", timeout_s: float | None = None) -> Launch:
    """Set up torch.distributed's default process group from the launcher's variables
    (:func:`launch`) and return them; if a group exists, check that it agrees. Many ranks
    need ``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun sets them; under srun or mpirun,
    export them: docs/many-machines.md shows how). One process gets a group of its own, in memory.
    ``backend``: "gloo" (CPU tensors) or "nccl" (CUDA tensors)."""
    dist, where = _dist(), launch()
    if dist.is_initialized():
        group = (dist.get_rank(), dist.get_world_size())
        if group != (where.rank, where.world_size):
            raise ValueError(f"torch.distributed's process group (rank {group[0]} of "
                             f"{group[1]}) disagrees with the launcher's variables (rank "
                             f"{where.rank} of {where.world_size}, from {where.launcher})")
        return where
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    if where.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
        return where
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"{' and '.join(missing)} must be set for {where.world_size} ranks to meet "
            f"(torchrun sets them; under {where.launcher}, export MASTER_ADDR as the first "
            f"node's host name and MASTER_PORT as a free port before launching)")
    dist.init_process_group(backend, rank=where.rank, world_size=where.world_size, **kw)
    return where


def _world() -> tuple:
    """(torch.distributed, world size); (None, 1) where there is no group: one rank."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None, 1
    if not dist.is_available() or not dist.is_initialized():
        return None, 1
    return dist, dist.get_world_size()


def gather_traj_infos(episodes: Sequence) -> list:
    """Every rank's episodes, on every rank: pass ``batch.traj_infos`` or what
    ``evaluate_agent()`` returned (the same call on every rank). They come in the order
    one sampler with all ranks' envs would list them (by step, then global env index), as
    an :class:`~sampling.samplers.Episodes`; plain lists come rank after rank. Without a
    process group (one rank), the episodes themselves."""
    dist, n = _world()
    if n == 1:
        return episodes
    everyone = [None] * n
    dist.all_gather_object(everyone, episodes)
    return merge_episodes(everyone)


def merge_episodes(per_rank: Sequence) -> list:
    """The episode lists of ranks 0, 1, ... (each a ``batch.traj_infos`` or an
    ``evaluate_agent()`` result) as one, in the order one sampler with all their envs
    lists them: by step, then global env index (for those who gather by other means, e.g.
    mpi4py). Lists without that order (plain lists) are joined rank after rank."""
    from .samplers import Episodes
    if not all(isinstance(e, Episodes) for e in per_rank):
        return [traj for trajs in per_rank for traj in trajs]
    merged = sorted(((end, traj) for e in per_rank for end, traj in zip(e.ends, e)),
                    key=lambda x: x[0])  # global (step, env): no two episodes share one
    return Episodes((t, b, traj) for (t, b), traj in merged)


def mean_stats(traj_infos: Sequence, keys: Sequence = ("Return", "Length")) -> dict:
    """The mean of each of ``keys`` of the episodes' ``stats()`` over all ranks, and
    ``"episodes"``, their number (one all-reduce of ``len(keys) + 1`` numbers; every rank
    calls it). A mean over no episodes is nan."""
    keys = list(keys)
    sums = np.zeros(len(keys) + 1)
    for traj in traj_infos:
        stats = traj.stats()
        try:
            sums[:-1] += [float(stats[k]) for k in keys]
        except KeyError as e:
            raise KeyError(f"mean_stats: an episode's stats() has no {e.args[0]!r}; it has "
                           f"{sorted(stats)}") from None
        sums[-1] += 1
    dist, n = _world()
    if n > 1:
        import torch
        t = torch.from_numpy(sums)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        sums = t.cpu().numpy()
    count = sums[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {k: float(sums[i] / count) if count else float("nan") for i, k in enumerate(keys)}
    out["episodes"] = int(count)
    return out


def broadcast_parameters(agent: Any, src: int = 0) -> None:
    """Copy rank ``src``'s parameters into every rank's ``agent``, in place: those a
    ``cpu`` worker's copy would receive (``agent.shared_arrays()``, or the torch modules
    the agent holds; an ``nn.Module`` itself works too). Call it on every rank before
    the first batch, so that all ranks sample with the same initial weights."""
    dist, n = _world()
    if n == 1:
        return
    import torch

    from .agent_state import Params
    from .tree import tree_leaves
    params = Params(agent)
    if params.empty:
        raise TypeError(f"broadcast_parameters found no parameters in {type(agent).__name__}: "
                        f"it holds no torch module and has no shared_arrays() method")
    with torch.no_grad():
        for _, leaf in tree_leaves(params.arrays()):
            t = leaf.detach() if isinstance(leaf, torch.Tensor) else torch.from_numpy(leaf)
            c = t if t.is_contiguous() else t.contiguous()  # broadcast needs contiguous
            dist.broadcast(c, src)
            if c is not t:
                t.copy_(c)
