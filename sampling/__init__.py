"""sampling: run many RL environments in parallel and get their experience as [T, B] batches.

rlpyt's sampler family (serial, cpu, gpu, alternating, no_overlap_alternating) on the
standard library's multiprocessing and shared memory; numpy and cloudpickle only.
Importing the package has no side effects and imports neither torch nor gymnasium. The
built-in envs (:mod:`.envs`: ``CartPole``, ``VectorCartPole``) are imported on first use:
the core never needs them, so a vendored copy may drop them, as it may drop ``bench/``.
"""
from .agents import RandomAgent
from .api import env_spaces, make_sampler, make_vector_env
from .collector import Segment, TrajInfo, env_seed
from .errors import (
    RemoteTraceback,
    SamplerClosedError,
    SamplerError,
    SharedMemoryFullError,
    WorkerError,
)
from .kinds import KINDS, usable_cpus
from .samplers import Batch, Episodes, Restart, Sampler

__version__ = "0.1.0"

__all__ = [
    "make_sampler", "make_vector_env", "env_spaces", "Sampler", "Batch", "Episodes", "Restart",
    "env_seed", "KINDS", "TrajInfo", "Segment", "RandomAgent", "CartPole", "VectorCartPole",
    "SamplerError", "WorkerError", "SamplerClosedError", "SharedMemoryFullError",
    "RemoteTraceback", "usable_cpus", "__version__",
]


def __getattr__(name: str):
    if name in ("CartPole", "VectorCartPole"):  # the built-in envs, on first use
        from . import envs
        return getattr(envs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
