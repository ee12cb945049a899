"""Never hang, never leak: the paths of issue 11.

- Names: under spawn/forkserver the per-worker semaphores (``sem.mp-*``) and the segment
  lose their names as soon as every worker is ready, so nothing named survives start-up:
  not a SIGKILL of the whole process group, the parent's ``os._exit`` or SIGTERM, nor a
  caught WorkerError kept alive.
- Envs: every env's ``close()`` runs, within a bounded time, on every path where its
  worker survives (normal shutdown, a fault in another worker, an exception in the
  ``with`` body, a sampler dropped by the garbage collector, the parent killed). The
  test env owns a ``sleep 300`` child process, as an env wrapping a simulator does, and
  stops it in ``close()``: no such child may be left. A SIGKILLed worker cannot close
  anything: its envs' children are the one orphan left, and the test says so.
- Ctrl-C during a graceful shutdown still ends every worker.
- ``shutdown_timeout`` must be finite and at most a day.
- /dev/shm too small: the segment's space is reserved at creation, and the error says
  how big it is, how much is free and what to do; a worker dying of SIGBUS is reported
  with /dev/shm as the likely cause. Out of memory: the error names the allocation.

Every test is bounded (a few seconds) and checks for leaks (``no_leaks``, or the
subprocess's own records).
"""
from __future__ import annotations

import errno
import functools
import gc
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

import sampling
from sampling import SamplerClosedError, WorkerError
from sampling.errors import SharedMemoryFullError
from tests.conftest import LeakWatch
from tests.fault_helpers import (
    RECORD_NAMES,
    ROOT,
    SCRIPT_TIMEOUT_S,
    SimulatorEnv,
    StuckCloseEnv,
    TrainingError,
    arena_in_the_window,
    interrupt_after,
    read_until_ready,
    script_env,
    simulator_pids,
    wait_until,
    worker_pid,
)
from tests.helpers import (
    ALL_METHODS,
    METHODS_AND_SMOKE,
    PARALLEL,
    CountingAgent,
    CountingEnv,
    FaultEnv,
    alive,
    kill_all,
    one_per,
    shm_entries,
    with_methods,
)

# One kind per driver and group count: the ways of laying out workers and their semaphores.
LAYOUTS = one_per("driver", "groups", kinds=PARALLEL)
PER_DRIVER = one_per("driver", kinds=PARALLEL)
NAMED = [m for m in ALL_METHODS if m != "fork"]  # start methods whose semaphores have names
SMALL = dict(batch_T=5, batch_B=4, n_workers=2)
BOUND_S = 5.0  # every error and every close here must come within this many seconds


# -- 1. nothing named outlives start-up ----------------------------------------------------------
@pytest.mark.start_method_matters
@pytest.mark.parametrize("start_method", NAMED)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_no_name_outlives_start_up(kind, start_method, no_leaks):
    with sampling.make_sampler(kind, CountingEnv, CountingAgent(), start_method=start_method,
                               eval_n_envs=2, eval_max_steps=10, **SMALL) as sampler:
        created = no_leaks.created
        assert len([n for n in created if n.startswith("sem.mp-")]) == 4, created
        assert len([n for n in created if not n.startswith("sem.")]) == 1, created
        assert no_leaks.present() == set(), "a name outlived the sampler's construction"
        # the semaphores still work without their names (gpu, alternating: every step)
        for batch in sampler.steps(2):
            assert batch.reward.shape == (5, 4)
        assert len(sampler.evaluate_agent(0)) >= 1
        assert no_leaks.present() == set()


@pytest.mark.start_method_matters
@pytest.mark.parametrize("start_method", NAMED)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_no_name_while_a_construction_error_is_kept(kind, start_method, no_leaks):
    # The WorkerError's frames hold the semaphores: in a notebook, forever. Their names go
    # with the sampler all the same.
    env_fn = functools.partial(FaultEnv, where="init")
    with pytest.raises(WorkerError, match=r"worker 1 .*raised EnvFault") as ei:
        sampling.make_sampler(kind, env_fn, CountingAgent(), start_method=start_method,
                              **SMALL)
    assert any(n.startswith("sem.mp-") for n in no_leaks.created)
    assert no_leaks.present() == set(), "names left while the error is referenced"
    assert ei.value.__traceback__ is not None


# A script that starts a sampler, prints the /dev/shm names it creates (as they appear) and
# the pids of its workers, then READY; then, per `how`, it exits with os._exit, SIGKILLs its
# own process group, or waits to be killed. Its envs own `sleep 300` children (SimulatorEnv).
NAMES_SCRIPT = RECORD_NAMES + textwrap.dedent("""
    import sampling
    from tests.fault_helpers import SimulatorEnv
    from tests.helpers import CountingAgent

    if __name__ == "__main__":
        kind, method, how, pid_dir = sys.argv[1:5]
        env_fn = functools.partial(SimulatorEnv, pid_dir, where="none")
        s = sampling.make_sampler(kind, env_fn, CountingAgent(), batch_T=5, batch_B=4,
                                  n_workers=2, start_method=method)
        s.obtain_samples(0)
        workers = [p.pid for p in mp.active_children() if p.name.startswith("sampling-")]
        print("PIDS", *workers)
        print("READY", flush=True)
        if how == "exit":
            os._exit(0)
        if how == "killpg":  # everyone at once: itself, workers, resource tracker, envs' children
            os.killpg(os.getpgid(0), signal.SIGKILL)
        time.sleep(120)
""")


PARENT_DEATHS = [(how, k, m) for how, k, m in
                 [("killpg", k, "spawn") for k in LAYOUTS] + [("killpg", "gpu", "forkserver")]
                 + [(how, k, m) for how in ("kill", "term", "exit")
                    for k, m in (("cpu", "spawn"), ("alternating", "forkserver"))]
                 if m in ALL_METHODS]


@pytest.mark.start_method_matters
@pytest.mark.parametrize("how,kind,start_method", PARENT_DEATHS)
def test_parent_death_leaves_no_name_and_no_orphan(how, kind, start_method, tmp_path):
    """killpg: the script SIGKILLs its whole process group (itself, workers, resource
    tracker, the envs' children); kill/term: SIGKILL/SIGTERM to the parent alone; exit:
    os._exit in the parent. No name it created is left; where the workers survive their
    parent, they close their envs (no `sleep 300` left) and the resource tracker has
    nothing to warn about."""
    pid_dir = tmp_path / "sims"
    pid_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", NAMES_SCRIPT, kind, start_method, how,
                             str(pid_dir)], cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    workers: list = []
    try:
        info = read_until_ready(proc, time.monotonic() + SCRIPT_TIMEOUT_S)
        names = set(info["SHM"])
        workers = [int(p) for p in info["PIDS"]]
        assert len(workers) == 2
        assert len([n for n in names if n.startswith("sem.mp-")]) == 4, names
        assert not names & shm_entries(), "a name outlived the sampler's construction"
        if how in ("kill", "term"):
            os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGTERM)
        _, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
        err = err.decode()
        assert wait_until(lambda: not any(alive(p) for p in workers), BOUND_S), \
            "workers outlived their parent"
        assert not names & shm_entries(), f"left in /dev/shm: {sorted(names & shm_entries())}"
        assert "leaked" not in err and "resource_tracker" not in err, err
        started, closed = simulator_pids(pid_dir)
        assert len(started) == 5, started  # 4 envs and the parent's probe
        if how != "killpg":  # (killpg killed the envs' children with everyone else)
            assert set(started) == closed, "an env was not closed"
        # (a SIGKILLed group dies asynchronously: its members may take a moment to go)
        assert wait_until(lambda: not any(alive(p) for p in started), BOUND_S), \
            "an env's child process was orphaned"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_all(workers)
        if pid_dir.exists():
            kill_all(simulator_pids(pid_dir)[0])


# -- 2. every env is closed on every path its worker survives -----------------------------------
@pytest.fixture
def sims(tmp_path):
    """A directory for SimulatorEnv's records; any `sleep 300` left is killed afterwards."""
    pid_dir = tmp_path / "sims"
    pid_dir.mkdir()
    yield pid_dir
    kill_all(simulator_pids(pid_dir)[0])


def _assert_all_closed(pid_dir, n_envs: int) -> None:
    started, closed = simulator_pids(pid_dir)
    assert len(started) == n_envs + 1, started  # and the parent's probe env
    orphans = [p for p in started if alive(p)]
    assert not orphans, f"`sleep 300` children of envs left running: {orphans}"
    assert set(started) == closed, "an env's close() did not run"


ENV_PATHS = ["shutdown", "worker_fault", "body_exception", "gc", "keyboard_interrupt"]


@pytest.mark.parametrize("path", ENV_PATHS)
@pytest.mark.parametrize("kind,start_method", with_methods(LAYOUTS))
def test_every_env_is_closed(kind, start_method, path, sims, no_leaks):
    fault = (dict(where="step", after=7, fail_env=3) if path == "worker_fault"
             else dict(where="none"))
    env_fn = functools.partial(SimulatorEnv, str(sims), safe_pid=os.getpid(), **fault)
    sampler = sampling.make_sampler(kind, env_fn, CountingAgent(), start_method=start_method,
                                    **SMALL)
    sampler.obtain_samples(0)
    t0 = time.monotonic()
    if path == "shutdown":
        sampler.shutdown()
    elif path == "worker_fault":  # worker 1's env 3 raises: worker 0 is stopped
        with pytest.raises(WorkerError, match=r"worker 1 .*raised EnvFault"):
            sampler.obtain_samples(1)
    elif path == "body_exception":
        with pytest.raises(TrainingError):
            with sampler:
                t0 = time.monotonic()
                raise TrainingError("in train()")
    elif path == "keyboard_interrupt":  # Ctrl-C between two batches
        with pytest.raises(KeyboardInterrupt):
            with sampler:
                t0 = time.monotonic()
                raise KeyboardInterrupt
    else:  # forgotten: the garbage collector's finalizer closes it
        del sampler
        gc.collect()
    elapsed = time.monotonic() - t0
    assert not no_leaks.alive(), "a worker is still alive"
    assert elapsed < BOUND_S, f"closing took {elapsed:.2f} s"
    _assert_all_closed(sims, 4)


@pytest.mark.parametrize("kind,start_method", with_methods(PER_DRIVER))
def test_sigkilled_worker_cannot_close_its_envs(kind, start_method, sims, no_leaks):
    # What the README says: SIGKILL leaves no chance to run close(). The other worker's
    # envs are closed; the killed worker's children are orphans (the fixture kills them).
    env_fn = functools.partial(SimulatorEnv, str(sims), where="none")
    with sampling.make_sampler(kind, env_fn, CountingAgent(), start_method=start_method,
                               **SMALL) as sampler:
        sampler.obtain_samples(0)
        victim = worker_pid(kind, 1)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerError, match="killed by signal SIGKILL"):
            sampler.obtain_samples(1)
    started, closed = simulator_pids(sims)
    orphans = {p for p, owner in started.items() if owner == victim}
    assert len(orphans) == 2 and all(alive(p) for p in orphans)
    others = set(started) - orphans
    assert others == closed and not [p for p in others if alive(p)]


def test_a_sigterm_from_outside_is_reported_and_closes_the_envs(sims, no_leaks):
    # A scheduler's SIGTERM to one worker: it closes its envs, dies of SIGTERM, and the
    # parent's error names the signal.
    env_fn = functools.partial(SimulatorEnv, str(sims), where="none")
    with sampling.make_sampler("gpu", env_fn, CountingAgent(), start_method="fork",
                               **SMALL) as sampler:
        sampler.obtain_samples(0)
        victim = worker_pid("gpu", 1)
        os.kill(victim, signal.SIGTERM)
        with pytest.raises(WorkerError, match="worker 1 .*killed by signal SIGTERM") as ei:
            sampler.obtain_samples(1)
        assert ei.value.exitcode == -signal.SIGTERM
    _assert_all_closed(sims, 4)


EXIT_SCRIPT = textwrap.dedent("""
    import tempfile
    keep = tempfile.TemporaryDirectory()  # weakref.finalize's exit hook before multiprocessing's
    import functools, sys, time
    import multiprocessing as mp
    import sampling
    from tests.fault_helpers import SimulatorEnv
    from tests.helpers import CountingAgent

    class StuckCloseEnv(SimulatorEnv):
        def close(self):
            if mp.current_process().name.startswith("sampling-"):
                time.sleep(300)
            super().close()

    if __name__ == "__main__":
        env_fn = functools.partial(StuckCloseEnv, sys.argv[1], where="none")
        s = sampling.make_sampler("cpu", env_fn, CountingAgent(), batch_T=5, batch_B=4,
                                  n_workers=2, start_method="fork")
        s.obtain_samples(0)
        print("EXITING", flush=True)  # without shutdown()
""")


def test_exit_with_an_open_sampler_and_a_stuck_close_is_bounded(sims):
    # multiprocessing's exit hook SIGTERMs daemonic workers and joins them without a limit;
    # the sampler's own hook runs first and kills a worker whose env's close() is stuck
    # (after sampling.pool.TERMINATE_GRACE_S).
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(sims)], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0 and "EXITING" in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert elapsed < 10, f"the interpreter took {elapsed:.1f} s to exit"


# -- 3. Ctrl-C during a graceful shutdown ---------------------------------------------------------
@pytest.mark.parametrize("how", ["signal", "interrupt_main"])
@pytest.mark.parametrize("kind,start_method", with_methods(PER_DRIVER))
def test_ctrl_c_during_graceful_shutdown(kind, start_method, how, sims, no_leaks):
    # Each env's close() takes 0.5 s: the Ctrl-C comes while the workers close them.
    env_fn = functools.partial(SimulatorEnv, str(sims), where="none", close_delay=0.5)
    sampler = sampling.make_sampler(kind, env_fn, CountingAgent(), start_method=start_method,
                                    **SMALL)
    sampler.obtain_samples(0)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with interrupt_after(0.3, how):
            sampler.shutdown()
    elapsed = time.monotonic() - t0
    # no waiting here: shutdown() returned only once every worker was gone
    assert not no_leaks.alive(), "a worker outlived the shutdown"
    assert mp.active_children() == []
    assert no_leaks.present() == set()
    assert elapsed < BOUND_S, f"the interrupted shutdown took {elapsed:.2f} s"
    with pytest.raises(SamplerClosedError):
        sampler.obtain_samples(1)
    sampler.shutdown()  # a second one: nothing left to do
    # 2 x 0.5 s per worker: within sampling.pool.TERMINATE_GRACE_S
    _assert_all_closed(sims, 4)


@pytest.mark.parametrize("start_method", METHODS_AND_SMOKE)
def test_ctrl_c_during_a_forced_shutdown(start_method, sims, no_leaks):
    # The exception in the body stops the workers with SIGTERM; they close their slow envs
    # while the parent waits its grace period (sampling.pool.TERMINATE_GRACE_S), and the
    # Ctrl-C lands in that wait.
    env_fn = functools.partial(SimulatorEnv, str(sims), where="none", close_delay=0.5)
    sampler = sampling.make_sampler("cpu", env_fn, CountingAgent(), start_method=start_method,
                                    **SMALL)
    sampler.obtain_samples(0)
    with pytest.raises(KeyboardInterrupt) as ei:
        with interrupt_after(0.3, "interrupt_main"), sampler:
            raise TrainingError("in train()")
    assert isinstance(ei.value.__context__, TrainingError)
    assert not no_leaks.alive(), "a worker outlived the shutdown"
    assert no_leaks.present() == set()
    _assert_all_closed(sims, 4)


# -- 3b. a worker stopped while it makes multiprocessing's arena file ----------------------------
def test_a_worker_stopped_while_making_a_shared_array_leaves_no_arena_file(tmp_path,
                                                                            no_leaks):
    """A worker SIGTERMed between multiprocessing.heap.Arena's mkstemp and unlink (a
    gymnasium AsyncVectorEnv, or any mp.Array, made in env_fn) leaves /dev/shm/pym-<pid>-*:
    the pool removes it once the worker is gone."""
    env_fn = functools.partial(arena_in_the_window, str(tmp_path / "in_the_window"))
    try:
        with pytest.raises(WorkerError, match="worker 0 .*worker 0 fails while worker 1"):
            sampling.make_sampler("cpu", env_fn, CountingAgent(), start_method="fork",
                                  **SMALL)
        assert (tmp_path / "in_the_window").exists()  # worker 1 was stopped in the window
        left = [n for n in shm_entries() if n.startswith(f"pym-{no_leaks.pids[1]}-")]
        assert not left, f"left in /dev/shm: {left}"
    finally:  # a failure must not leave its leak to the next tests
        for n in shm_entries():
            if no_leaks.pids and n.startswith(tuple(f"pym-{p}-" for p in no_leaks.pids)):
                os.unlink(f"/dev/shm/{n}")


# -- 4. shutdown_timeout -------------------------------------------------------------------------
@pytest.mark.parametrize("value,exc,match", [
    (float("inf"), ValueError, r"shutdown_timeout must be a number >= 0 and <= 86400 \(a day\), "
                               r"got inf"),
    (1e300, ValueError, r"<= 86400 \(a day\), got 1e\+300"),
    (float("nan"), ValueError, r"<= 86400 \(a day\), got nan"),
    (10**400, ValueError, r"<= 86400 \(a day\)"),
    (86400.5, ValueError, r"<= 86400 \(a day\), got 86400.5"),
    (-0.1, ValueError, r"must be a number >= 0"),
    (True, TypeError, r"shutdown_timeout must be a number of seconds, got True \(bool\)"),
    ("5", TypeError, r"got '5' \(str\)"),
    (None, TypeError, r"got None"),
])
def test_shutdown_timeout_validated(value, exc, match):
    with pytest.raises(exc, match=match):
        sampling.make_sampler("cpu", CountingEnv, CountingAgent(), shutdown_timeout=value,
                              **SMALL)


@pytest.mark.parametrize("value", [0, 0.0, 86400, 2.5])
def test_shutdown_timeout_accepted(value, sims, no_leaks):
    """Any value in [0, a day] works: with envs that close quickly, shutdown() returns once
    they are closed (86400: it does not wait the timeout out; 0: the workers are stopped
    at once, and still close their envs within the grace period)."""
    env_fn = functools.partial(SimulatorEnv, str(sims), where="none")
    sampler = sampling.make_sampler("gpu", env_fn, CountingAgent(), start_method="fork",
                                    shutdown_timeout=value, **SMALL)
    sampler.obtain_samples(0)
    t0 = time.monotonic()
    sampler.shutdown()
    assert time.monotonic() - t0 < BOUND_S
    assert not no_leaks.alive() and no_leaks.present() == set()
    _assert_all_closed(sims, 4)


# shutdown() waits shutdown_timeout for the envs to close, then forces the workers: SIGTERM,
# a grace period, SIGKILL. The README's promise: it "takes at most shutdown_timeout + 2 s".
GRACE_S = 2.0
SHORT_TIMEOUT_S = 1.0
LOADED_SLACK_S = 2.0  # a loaded 2-core machine may take this much longer to stop processes
# Each env's close() in the test of a shutdown that waits: a worker closes its 2 envs one
# after the other, longer than the grace period a forced stop would give them ...
SLOW_CLOSE_S = 1.5
LONG_TIMEOUT_S = 30.0  # ... and far shorter than this shutdown_timeout


def test_shutdown_waits_for_slow_closes_within_shutdown_timeout(sims, no_leaks):
    env_fn = functools.partial(SimulatorEnv, str(sims), where="none", close_delay=SLOW_CLOSE_S)
    sampler = sampling.make_sampler("cpu", env_fn, CountingAgent(), start_method="fork",
                                    shutdown_timeout=LONG_TIMEOUT_S, **SMALL)
    sampler.obtain_samples(0)
    t0 = time.monotonic()
    sampler.shutdown()
    elapsed = time.monotonic() - t0
    assert 2 * SLOW_CLOSE_S <= elapsed < LONG_TIMEOUT_S, elapsed
    assert not no_leaks.alive() and no_leaks.present() == set()
    _assert_all_closed(sims, 4)


@pytest.mark.parametrize("kind", PER_DRIVER)
def test_shutdown_forces_the_workers_after_shutdown_timeout(kind, sims, no_leaks):
    """Envs whose close() never returns: shutdown() waits shutdown_timeout, then SIGTERMs
    the workers (still in close(), they ignore it) and SIGKILLs them after the grace
    period: it takes both in full, and no more than the README's bound (with slack).
    Nothing of the sampler is left; the envs' own children are the orphans that a SIGKILL
    leaves (README, "What cannot be closed"; the fixture kills them)."""
    env_fn = functools.partial(StuckCloseEnv, str(sims), where="none")
    sampler = sampling.make_sampler(kind, env_fn, CountingAgent(), start_method="fork",
                                    shutdown_timeout=SHORT_TIMEOUT_S, **SMALL)
    sampler.obtain_samples(0)
    t0 = time.monotonic()
    sampler.shutdown()
    elapsed = time.monotonic() - t0
    assert SHORT_TIMEOUT_S + GRACE_S <= elapsed < SHORT_TIMEOUT_S + GRACE_S + LOADED_SLACK_S, \
        elapsed
    assert not no_leaks.alive() and mp.active_children() == []
    assert no_leaks.present() == set()
    started, closed = simulator_pids(sims)
    assert len(started) == 5 and len(closed) == 1  # only the parent's probe env was closed
    with pytest.raises(SamplerClosedError):
        sampler.obtain_samples(1)


# -- 7. /dev/shm too small -----------------------------------------------------------------------
MB = 2**20


def _full_shm(monkeypatch, free=1 * MB, total=64 * MB):
    def fallocate(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def statvfs(path):
        assert path == "/dev/shm"
        return types.SimpleNamespace(f_bavail=free // 4096, f_frsize=4096,
                                     f_blocks=total // 4096)

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    monkeypatch.setattr(os, "statvfs", statvfs, raising=False)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_shm_space_is_checked(kind, monkeypatch, no_leaks):
    _full_shm(monkeypatch)
    with pytest.raises(SharedMemoryFullError) as ei:
        sampling.make_sampler(kind, CountingEnv, CountingAgent(), batch_T=500, batch_B=4,
                              n_workers=2, eval_n_envs=2, eval_max_steps=10,
                              start_method="fork")
    msg = str(ei.value)
    nbytes = ei.value.nbytes
    assert nbytes > 100_000
    assert msg.startswith(f"cannot reserve {nbytes / 2**10:.1f} KB ({nbytes} bytes) of shared "
                          f"memory for the batch [batch_T=500, batch_B=4]: "), msg
    assert "the eval buffers [eval_n_envs=2]: " in msg
    assert ("/dev/shm has 1.0 MB (1048576 bytes) free of 64.0 MB (67108864 bytes)" in msg), msg
    assert "--shm-size" in msg and "batch_T, batch_B, eval_n_envs" in msg
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOSPC
    assert isinstance(ei.value, sampling.SamplerError)
    assert isinstance(ei.value.__cause__, OSError)
    assert any(n.startswith("psm") for n in no_leaks.created)
    assert no_leaks.present() == set(), "the segment was left behind"
    assert no_leaks.pids == [], "workers started before the space check"


def test_shm_space_not_checked_where_fallocate_is_unsupported(monkeypatch, no_leaks):
    """A filesystem that cannot reserve (EOPNOTSUPP): the sampler is made and works (its
    pages come when touched), and a worker's SIGBUS then names /dev/shm's space as the
    likely cause, as where posix_fallocate does not exist."""
    tried: list = []

    def fallocate(fd, offset, length):
        tried.append(length)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    env_fn = functools.partial(FaultEnv, where="step", after=7, fail_env=3, how="bus",
                               safe_pid=os.getpid())
    with sampling.make_sampler("cpu", env_fn, CountingAgent(), start_method="fork",
                               **SMALL) as sampler:
        assert tried and tried[0] > 0, "posix_fallocate was not tried"
        batch = sampler.obtain_samples(0)
        assert batch.observation[0, :, 0].tolist() == [0, 1, 2, 3]  # env ids (seeds)
        assert batch.reward[:3, 0].tolist() == [1, 2, 3]  # CountingEnv: reward = t
        with pytest.raises(WorkerError) as ei:
            sampler.obtain_samples(1)
    assert ei.value.exitcode == -signal.SIGBUS
    assert "most likely /dev/shm ran out of space" in str(ei.value)


@pytest.mark.parametrize("reserved", [True, False])
@pytest.mark.parametrize("kind", PER_DRIVER)
def test_worker_sigbus_names_dev_shm(kind, reserved, monkeypatch, no_leaks):
    if not reserved:  # a platform or filesystem that cannot reserve the segment's space
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    env_fn = functools.partial(FaultEnv, where="step", after=7, fail_env=3, how="bus",
                               safe_pid=os.getpid())
    with sampling.make_sampler(kind, env_fn, CountingAgent(), start_method="fork",
                               **SMALL) as sampler:
        with pytest.raises(WorkerError) as ei:
            sampler.obtain_samples(0)
            sampler.obtain_samples(1)
    msg = str(ei.value)
    assert ei.value.exitcode == -signal.SIGBUS
    head = f"{kind} sampler: worker 1 (envs 2..3) was killed by signal SIGBUS: "
    if reserved and hasattr(os, "posix_fallocate"):
        assert msg.startswith(head + "a page of memory-mapped shared memory or file could not "
                              "be backed. The sampler's own segment ("), msg
        assert "reserved at start-up, so look for an env that maps files" in msg
    else:
        assert msg.startswith(head + "most likely /dev/shm ran out of space, so a page of the "
                              "sampler's shared-memory segment ("), msg
        assert "batch_T, batch_B, eval_n_envs" in msg
    assert "/dev/shm has " in msg and "--shm-size" in msg and "out-of-memory" not in msg


def _unshare_works() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


SMALL_SHM_SCRIPT = textwrap.dedent("""
    import os, sys
    import sampling
    from sampling.errors import SharedMemoryFullError
    from tests.helpers import CountingAgent, CountingEnv

    if __name__ == "__main__":
        case = sys.argv[1]
        if case == "no_fallocate":  # a platform that cannot reserve: pages fail when touched
            del os.posix_fallocate
        # 25.6 MB to refuse; 5.1 MB to fail on the first page past 4 MB (each row stepped
        # before it costs time); 0.3 MB that fits
        T = {"reserve": 100_000, "no_fallocate": 20_000}.get(case, 1000)
        kind, agent = "gpu", CountingAgent()
        if case == "params":  # the parent itself died of SIGBUS here, writing parameters
            import numpy as np

            class BigAgent(CountingAgent):
                w = np.zeros(2**20, np.float64)  # 8 MB

                def shared_arrays(self):
                    return {"w": self.w}

            kind, agent = "cpu", BigAgent()
        try:
            with sampling.make_sampler(kind, CountingEnv, agent, batch_T=T, batch_B=4,
                                       n_workers=2, start_method="fork") as s:
                s.obtain_samples(0)
            print("OK")
        except (SharedMemoryFullError, sampling.WorkerError) as e:
            print(type(e).__name__, e)
        print("LEFT", *os.listdir("/dev/shm"))
""")


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -m` and tmpfs mounts (root)")
@pytest.mark.parametrize("case", ["reserve", "no_fallocate", "fits", "params"])
def test_small_dev_shm_for_real(case):
    # A private 4 MB /dev/shm (Docker gives 64 MB), in a mount namespace of its own.
    cmd = (f"mount -t tmpfs -o size=4m tmpfs /dev/shm && exec {sys.executable} -c "
           f"\"$SCRIPT\" {case}")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd],
                          cwd=ROOT, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                          env=dict(script_env(), SCRIPT=SMALL_SHM_SCRIPT))
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "LEFT \n" in out or out.rstrip().endswith("LEFT"), out  # nothing in /dev/shm
    if case == "fits":
        assert out.startswith("OK"), out + proc.stderr
    elif case == "params":
        assert out.startswith("SharedMemoryFullError cannot reserve 8.3 MB"), out
        assert ("the agent's parameters (copied to the cpu workers): 8.0 MB (8388608 bytes): "
                "/dev/shm has 4.0 MB") in out, out
    elif case == "reserve":
        assert out.startswith("SharedMemoryFullError cannot reserve 25.6 MB (26800256 bytes) "
                              "of shared memory for the batch [batch_T=100000, batch_B=4]"), out
        assert "/dev/shm has 4.0 MB (4194304 bytes) free of 4.0 MB (4194304 bytes)" in out, out
    else:
        # (whichever worker first touches a page past 4 MB)
        assert re.match(r"WorkerError gpu sampler: worker [01] \(envs [02]\.\.[13]\) was "
                        r"killed by signal SIGBUS: most likely /dev/shm ran out of space, "
                        r"so a page of the sampler's shared-memory segment \(5\.1 MB", out), out


# -- 8. out of memory while allocating -----------------------------------------------------------
def test_serial_out_of_memory_names_the_allocation(monkeypatch):
    import sampling.samplers as samplers

    def no_memory(n):
        raise MemoryError

    monkeypatch.setattr(samplers, "bytearray", no_memory, raising=False)
    with pytest.raises(MemoryError) as ei:
        sampling.make_sampler("serial", CountingEnv, CountingAgent(), batch_T=500, batch_B=4,
                              eval_n_envs=2, eval_max_steps=10)
    msg = str(ei.value)
    assert msg.startswith("out of memory allocating the sampler's buffer of "), msg
    assert "for the batch [batch_T=500, batch_B=4]: " in msg
    assert "the eval buffers [eval_n_envs=2]: " in msg
    assert "ulimit -v" in msg
    assert type(ei.value.__cause__) is MemoryError


@pytest.mark.parametrize("where", ["mmap", "fallocate"])
def test_shared_out_of_memory_names_the_allocation(where, monkeypatch, no_leaks):
    def enomem(*args, **kwargs):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    if where == "mmap":
        import mmap
        monkeypatch.setattr(mmap, "mmap", enomem)
    else:
        monkeypatch.setattr(os, "posix_fallocate", enomem, raising=False)
    agent = _ParamsAgent()
    with pytest.raises(MemoryError) as ei:
        sampling.make_sampler("cpu", CountingEnv, agent, batch_T=500, batch_B=4, n_workers=2,
                              start_method="fork")
    msg = str(ei.value)
    assert msg.startswith("out of memory allocating the sampler's shared-memory segment of "), msg
    assert "for the batch [batch_T=500, batch_B=4]: " in msg
    assert "the agent's parameters (copied to the cpu workers): 4.0 KB (4096 bytes)" in msg, msg
    assert isinstance(ei.value.__cause__, OSError)
    assert no_leaks.present() == set() and no_leaks.pids == []


class _ParamsAgent(CountingAgent):
    """A cpu-kind agent with a parameter block (its shared_arrays) of 4 KB."""

    def __init__(self):
        super().__init__()
        import numpy as np
        self.w = np.zeros(1024, np.float32)

    def shared_arrays(self):
        return {"w": self.w}


RLIMIT_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    import sampling
    from tests.helpers import CountingAgent, CountingEnv

    if __name__ == "__main__":
        kind = sys.argv[1]
        with open("/proc/self/status") as f:
            vm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize")][0]
        limit = vm + 512 * 2**20  # room to run, not for a 4 GB batch
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        t0 = time.monotonic()
        try:
            sampling.make_sampler(kind, CountingEnv, CountingAgent(), batch_T=50_000,
                                  batch_B=1024, n_workers=2, start_method="fork")
        except MemoryError as e:
            print(f"{time.monotonic() - t0:.2f}", e, flush=True)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.parametrize("kind", one_per("workers"))
def test_rlimit_as_for_real(kind):
    proc = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, kind], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    # The script must end normally and print the MemoryError: anything else (a crash, no
    # error raised) is a failure of the implementation, not of the platform.
    assert proc.returncode == 0 and proc.stdout, (proc.returncode, proc.stdout,
                                                  proc.stderr[-2000:])
    seconds, _, msg = proc.stdout.partition(" ")
    what = "shared-memory segment" if sampling.KINDS[kind].workers else "buffer"
    assert msg.startswith(f"out of memory allocating the sampler's {what} of "), msg
    assert "the batch [batch_T=50000, batch_B=1024]" in msg
    assert float(seconds) < BOUND_S


# -- the leak watch itself -----------------------------------------------------------------------
@pytest.mark.skipif("spawn" not in ALL_METHODS, reason="no named semaphores without spawn")
def test_leak_watch_fails_on_a_left_semaphore(monkeypatch):
    from sampling.internals import drop_semaphore_name as _drop_semaphore_name

    watch = LeakWatch().record(monkeypatch)
    sem = mp.get_context("spawn").Semaphore(0)
    (name,) = watch.created
    assert name.startswith("sem.mp-") and name in shm_entries()
    with pytest.raises(AssertionError, match=r"left in /dev/shm after the test: \['sem\.mp-.*"
                                             r"\(1 named semaphores\)"):
        watch.check(wait_s=0)
    _drop_semaphore_name(sem)
    assert name not in shm_entries()
    watch.check(wait_s=0)
    sem.release()
    assert sem.acquire(timeout=1)  # works without its name


# A child that leaves an entry in /dev/shm as a process dies between multiprocessing.heap's
# create and unlink: a file named as the arena's, and nothing that holds it.
LEAVE_ENTRY_SCRIPT = "import os, sys; open(os.path.join('/dev/shm', sys.argv[1]), 'w').close()"
# A process outside the test's family (double-forked, so no longer its descendant) that
# holds an entry open, as another test run's sampler would, until its stdin closes.
HOLD_ENTRY_SCRIPT = textwrap.dedent("""
    import os, sys
    if os.fork():
        os._exit(0)  # the intermediate process: the holder is reparented away from the test
    f = open(os.path.join('/dev/shm', sys.argv[1]), 'w')
    print('READY', flush=True)
    sys.stdin.read()
    f.close()
    os.unlink(f.name)
""")


def test_leak_watch_sees_entries_left_by_processes_the_test_started(monkeypatch):
    watch = LeakWatch().record(monkeypatch)
    name = f"pym-{os.getpid()}-leakwatch-test"
    try:
        subprocess.run([sys.executable, "-c", LEAVE_ENTRY_SCRIPT, name], check=True,
                       timeout=SCRIPT_TIMEOUT_S)
        assert name in shm_entries() and name not in watch.created
        with pytest.raises(AssertionError, match=rf"left in /dev/shm after the test: "
                                                 rf"\['{name}'\]; not created in the test's "
                                                 rf"own process"):
            watch.check(wait_s=0)
    finally:
        if name in shm_entries():
            os.unlink(f"/dev/shm/{name}")
    watch.check(wait_s=0)


def test_leak_watch_leaves_entries_held_by_other_processes_alone(monkeypatch):
    watch = LeakWatch().record(monkeypatch)
    name = f"leakwatch-test-{os.getpid()}-held"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_ENTRY_SCRIPT, name],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"READY\n"
        assert name in shm_entries()
        watch.check(wait_s=0)  # someone else's, in use
    finally:
        holder.stdin.close()  # the holder unlinks the entry and exits
        holder.stdout.close()
        holder.wait(SCRIPT_TIMEOUT_S)
    assert wait_until(lambda: name not in shm_entries(), BOUND_S)


def test_leak_watch_fails_on_a_left_segment(monkeypatch):
    from multiprocessing import shared_memory

    watch = LeakWatch().record(monkeypatch)
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        with pytest.raises(AssertionError, match=r"left in /dev/shm after the test: \['psm"):
            watch.check(wait_s=0)
    finally:
        shm.close()
        shm.unlink()
    watch.check(wait_s=0)

