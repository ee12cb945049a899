"""The private CPython names the package relies on live in sampling/internals.py only, exist
in this interpreter, and have fallbacks that work."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import sys
from multiprocessing import shared_memory, util
from pathlib import Path

import numpy as np
import pytest

from sampling import internals

PACKAGE = Path(internals.__file__).parent
# What internals.py wraps: nowhere else in the package may name these.
PRIVATE = re.compile(r"\._fd\b|\._mmap\b|\._buf\b|_finalizer_registry|\._cleanup\b|"
                     r"\._semlock\b|resource_tracker|sys\._getframe")


def test_this_python_has_every_private_name_the_package_uses():
    missing = internals.missing()
    assert not missing, (
        f"Python {sys.version.split()[0]} lacks {missing}, which sampling/internals.py uses; "
        f"its public fallbacks run instead (a second mapping, a descriptor opened by name, "
        f"semaphore names left to the exit-time cleanup). Update internals.py for this "
        f"version")


def test_no_other_module_names_a_private_cpython_name():
    found = [f"{p.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
             for p in sorted(PACKAGE.rglob("*.py")) if p.name != "internals.py"
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if PRIVATE.search(line.split("#")[0])]
    assert not found, "private CPython names outside sampling/internals.py:\n" + "\n".join(found)


def test_the_mapping_and_descriptor_fallbacks_give_the_same_pages():
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        np.ndarray((4,), np.int64, buffer=shm.buf)[:] = [1, 2, 3, 4]

        class Bare:  # a SharedMemory without the private attributes
            name, size = shm.name, shm.size

        fd = internals.segment_fd(Bare())
        mapping = internals.take_mapping(Bare())
        try:
            assert np.ndarray((4,), np.int64, buffer=mapping).tolist() == [1, 2, 3, 4]
        finally:
            mapping.close()
            os.close(fd)
    finally:
        shm.close()
        shm.unlink()


@pytest.mark.skipif("spawn" not in mp.get_all_start_methods(), reason="no named semaphores")
def test_without_the_finalizer_registry_a_semaphore_name_is_left_to_the_exit_cleanup(
        monkeypatch):
    sem = mp.get_context("spawn").Semaphore(0)
    name = internals.semaphore_name(sem)
    assert name and Path("/dev/shm", "sem." + name.lstrip("/")).exists()
    with monkeypatch.context() as m:
        m.delattr(util, "_finalizer_registry")
        assert internals.drop_semaphore_name(sem) is False
    assert Path("/dev/shm", "sem." + name.lstrip("/")).exists()
    assert internals.drop_semaphore_name(sem) is True
    assert not Path("/dev/shm", "sem." + name.lstrip("/")).exists()
    sem.release()
    assert sem.acquire(timeout=1)  # works without its name


class _ArenaThenFail:
    """An env_fn that leaves what multiprocessing.heap leaves when stopped between its
    mkstemp and unlink (/dev/shm/pym-<pid>-*), then fails: as a worker SIGTERMed while an
    env built AsyncVectorEnv's shared memory."""

    def __call__(self):
        import multiprocessing as mp
        if mp.current_process().name.endswith("worker-1"):
            open(os.path.join(internals.SHM_DIR, f"pym-{os.getpid()}-left"), "w").close()
            raise RuntimeError("stopped mid-arena")
        from tests.helpers import CountingEnv
        return CountingEnv()


def test_what_a_stopped_worker_left_of_multiprocessing_s_arena_is_removed():
    import sampling
    from tests.helpers import CountingAgent

    before = set(os.listdir(internals.SHM_DIR))
    with pytest.raises(sampling.WorkerError, match="stopped mid-arena"):
        sampling.make_sampler("cpu", _ArenaThenFail(), CountingAgent(), batch_T=2, batch_B=2,
                              n_workers=2, start_method="fork")
    assert not [n for n in set(os.listdir(internals.SHM_DIR)) - before
                if n.startswith("pym-")]
