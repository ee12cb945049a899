"""Agents that fail on purpose, envs that own a child process, and the bookkeeping of the
fault and leak tests (tests/test_faults.py, tests/test_leaks.py). The env that fails on
purpose, :class:`tests.helpers.FaultEnv`, is with the other toy envs.

Importable under spawn/forkserver (workers unpickle these classes by reference).
Every fault first writes ``time.monotonic()`` (system-wide on Linux, so comparable
across processes) to the ``stamp`` file when one is given: the test measures the time
from the fault to the parent's raise.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import select
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

from tests.helpers import CountingEnv, FaultEnv, in_worker, write_stamp

ROOT = Path(__file__).resolve().parents[1]
# A test's subprocess takes a few seconds; this is generous for a loaded machine, yet bounded.
SCRIPT_TIMEOUT_S = 60


class AgentFault(RuntimeError):
    """Raised by :class:`WorkerFaultAgent` and :class:`ParentFaultAgent`."""


class TwoArgError(Exception):
    """Pickles, but does not unpickle: ``__init__`` needs two arguments and ``args`` has one."""

    def __init__(self, what, detail):
        super().__init__(f"{what}: {detail}")


class LockedError(Exception):
    """Cannot be pickled at all (it holds a lock)."""

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def two_arg_error(msg):
    return TwoArgError(msg, "two-arg detail")


def locked_error(msg):
    return LockedError(msg)


def sys_exit(msg):
    return SystemExit(f"sys.exit: {msg}")


class _ZeroActions:
    """action 0 for every env; agent_info {"v": float32}."""

    @staticmethod
    def _act(observation):
        n = len(observation)
        return np.zeros(n, np.int64), {"v": np.zeros(n, np.float32)}


class WorkerFaultAgent(_ZeroActions):
    """A cpu-kind agent whose copy serving env ``fail_env`` raises :class:`AgentFault` on
    its call number ``after + 1``; never fails in the process with pid ``safe_pid``."""

    def __init__(self, fail_env=3, after=12, safe_pid=None, stamp=None):
        self.fail_env, self.after, self.safe_pid, self.stamp = fail_env, after, safe_pid, stamp
        self.calls = 0

    def step(self, observation, prev_action, prev_reward, env_ids=None):
        if env_ids is not None and self.fail_env in env_ids and os.getpid() != self.safe_pid:
            self.calls += 1
            if self.calls > self.after:
                self._agent_fault()
        return self._act(observation)

    def _agent_fault(self):
        write_stamp(self.stamp)
        raise AgentFault(f"agent boom after {self.after} calls")


class ParentFaultAgent(_ZeroActions):
    """Raises ``exc`` (an instance or class) in the process with pid ``parent_pid`` only:
    from ``step`` on its call number ``fail_at`` (the probe is call 1), or from
    ``sample_mode``/``eval_mode`` when ``hook`` names it. ``fault_time`` records when."""

    def __init__(self, parent_pid, fail_at=3, exc=AgentFault, hook="step"):
        self.parent_pid, self.fail_at, self.exc, self.hook = parent_pid, fail_at, exc, hook
        self.calls = 0
        self.fault_time = None

    def _maybe_fail(self, hook):
        if hook == self.hook and os.getpid() == self.parent_pid:
            self.fault_time = time.monotonic()
            exc = self.exc
            raise exc(f"parent agent boom in {hook}") if isinstance(exc, type) else exc

    def step(self, observation, prev_action, prev_reward):
        self.calls += 1
        if self.calls >= self.fail_at:
            self._maybe_fail("step")
        return self._act(observation)

    def sample_mode(self, itr):
        if itr >= 1:
            self._maybe_fail("sample_mode")

    def eval_mode(self, itr):
        self._maybe_fail("eval_mode")


class ReadyThenHangAgent(_ZeroActions):
    """For the parent-SIGKILL test: on its call ``at`` in the parent it prints READY and
    sleeps, so the parent is killed while the workers wait for actions mid-batch."""

    def __init__(self, parent_pid, at=5):
        self.parent_pid, self.at, self.calls = parent_pid, at, 0

    def step(self, observation, prev_action, prev_reward):
        self.calls += 1
        if os.getpid() == self.parent_pid and self.calls == self.at:
            print("READY", flush=True)
            time.sleep(120)
        return self._act(observation)


class SlowInitEnv(CountingEnv):
    """Sleeps ``delay`` seconds in its constructor inside sampler workers (not in the
    parent's probe), so that a sampler stays mid-construction for a while."""

    def __init__(self, delay=1.5, **kw):
        super().__init__(**kw)
        if mp.current_process().name.startswith("sampling-"):
            time.sleep(delay)


class BadShapeAgent(_ZeroActions):
    """Returns one action too many from its call ``from_call`` on (the probe is call 1)."""

    def __init__(self, from_call=3):
        self.from_call, self.calls = from_call, 0

    def step(self, observation, prev_action, prev_reward):
        self.calls += 1
        action, info = self._act(observation)
        if self.calls >= self.from_call:
            action = np.zeros(len(action) + 1, np.int64)
        return action, info


# Stand-ins for sampling.pool.worker_entry (same arguments), for the start-up tests: a
# worker process that dies before worker_entry's first statement is one that failed in
# multiprocessing's start-up (importing the main module, unpickling its arguments).
def exit_before_worker_main(w, program, payload, shm_name, nbytes, placed, conn, *rest):
    """Dies as a start-up failure does: exit code 1, no word on the pipe."""
    os._exit(1)


def killed_before_worker_main(w, program, payload, shm_name, nbytes, placed, conn, *rest):
    """SIGKILLed (say, by the out-of-memory killer) before any sampling code ran."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # the signal is on its way


def exit_after_started(w, program, payload, shm_name, nbytes, placed, conn, *rest):
    """Says Started as worker_entry does first, then exits: a death after start-up."""
    from sampling.pool import Started
    conn.send(Started())
    os._exit(3)


class SimulatorEnv(FaultEnv):
    """A FaultEnv that owns a child process, as an env wrapping a simulator does: a plain
    ``subprocess.Popen(["sleep", "300"])`` (no new session: what users write) started in
    the constructor, killed and reaped in ``close()``. Every instance writes
    ``<pid_dir>/<child pid>.started``; ``close()`` writes ``.closed`` once the child is
    gone. ``close_delay``: seconds ``close()`` takes first (a slow simulator)."""

    def __init__(self, pid_dir, close_delay=0.0, **kw):
        super().__init__(**kw)
        self.pid_dir, self.close_delay = pid_dir, close_delay
        # (no pipes shared with the test: an orphan must not hold a test's output open)
        self.sim = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        Path(pid_dir, f"{self.sim.pid}.started").write_text(str(os.getpid()))

    def close(self):
        sim, self.sim = self.sim, None
        if sim is None:
            return
        time.sleep(self.close_delay)
        sim.kill()
        sim.wait()
        Path(self.pid_dir, f"{sim.pid}.closed").touch()


class StuckCloseEnv(SimulatorEnv):
    """A SimulatorEnv whose ``close()`` never returns in a sampler worker (a simulator that
    hangs on exit); in the parent (the probe env) it closes as usual."""

    def close(self):
        if mp.current_process().name.startswith("sampling-"):
            time.sleep(300)
        super().close()


# How long worker 1 stays between its arena file's creation and unlink, and how long worker 0
# waits for it to get there: far longer than either takes.
ARENA_WINDOW_S = 30.0


def arena_in_the_window(stamp):
    """env_fn of the arena-leak test (fork only): worker 1 allocates a shared array, as
    gymnasium's AsyncVectorEnv does (multiprocessing.heap creates its arena file in /dev/shm
    and unlinks it at once), and stays between the two (up to ARENA_WINDOW_S) after writing
    ``stamp``; worker 0 waits for the stamp and raises, so the parent stops worker 1 with
    SIGTERM there. Elsewhere (the parent's probe) a plain CountingEnv."""
    if in_worker(1):
        real_unlink = os.unlink

        def unlink_later(path, *args, **kwargs):
            if os.path.basename(str(path)).startswith("pym-"):
                write_stamp(stamp)
                time.sleep(ARENA_WINDOW_S)
            return real_unlink(path, *args, **kwargs)

        os.unlink = unlink_later
        mp.get_context("fork").Array("d", 16)
    elif in_worker(0):
        deadline = time.monotonic() + ARENA_WINDOW_S
        while not os.path.exists(stamp) and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("worker 0 fails while worker 1 makes its arena")
    return CountingEnv()


def simulator_pids(pid_dir) -> tuple:
    """``(started, closed)``: ``{child pid: pid of the process that made the env}`` for
    every SimulatorEnv's child, and the set of those that close() stopped."""
    started, closed = {}, set()
    for n in os.listdir(pid_dir):
        pid, _, what = n.partition(".")
        if what == "started":
            started[int(pid)] = int(Path(pid_dir, n).read_text())
        elif what == "closed":
            closed.add(int(pid))
    return started, closed


# The opening of the tests' child scripts: print "SHM <name>" for every /dev/shm name the
# child creates (a segment, or a named semaphore under spawn/forkserver), as it appears.
RECORD_NAMES = textwrap.dedent("""
    import functools, os, signal, sys, threading, time
    import multiprocessing as mp
    import multiprocessing.shared_memory, multiprocessing.synchronize

    sem_init = mp.synchronize.SemLock.__init__
    shm_init = mp.shared_memory.SharedMemory.__init__
    def sem_init_rec(self, *a, **k):
        sem_init(self, *a, **k)
        if self._semlock.name:
            print("SHM", "sem." + self._semlock.name.lstrip("/"), flush=True)
    def shm_init_rec(self, name=None, create=False, size=0, *a, **k):
        shm_init(self, name, create, size, *a, **k)
        if create:
            print("SHM", self.name.lstrip("/"), flush=True)
    mp.synchronize.SemLock.__init__ = sem_init_rec
    mp.shared_memory.SharedMemory.__init__ = shm_init_rec
""")


# The child scripts' TMPDIR, made at the first script and removed when this process exits.
# A script that the test kills with SIGKILL under forkserver leaves the forkserver's socket
# folder (multiprocessing's /tmp/pymp-*, which only the killed process could remove): here,
# not in /tmp. Made on demand, not at import: worker processes import this module too, and
# those that end with os._exit() (fork, forkserver) run no atexit hook.
_script_tmpdir: list = []


def script_env() -> dict:
    """The environment of a test's child script: this one, with the repository importable."""
    if not _script_tmpdir:
        _script_tmpdir.append(tempfile.mkdtemp(prefix="sampling-tests-"))
        atexit.register(shutil.rmtree, _script_tmpdir[0], True)
    return dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=_script_tmpdir[0])


def sampling_children() -> list:
    """This process's live sampler workers."""
    return [p for p in mp.active_children() if p.name.startswith("sampling-")]


def worker_pid(kind: str, w: int) -> int:
    """The pid of worker ``w`` of this process's (one) ``kind`` sampler."""
    name = f"sampling-{kind}-worker-{w}"
    (p,) = [p for p in mp.active_children() if p.name == name]
    return p.pid


class TrainingError(Exception):
    """An exception in the user's training loop."""


def interrupt_main_thread(how: str = "signal") -> None:
    """A Ctrl-C: SIGINT to the main thread (``"signal"``, what a terminal does), or
    KeyboardInterrupt without a signal (``"interrupt_main"``: a blocked SIGINT cannot hold
    it back)."""
    if how == "signal":
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        import _thread
        _thread.interrupt_main()


@contextlib.contextmanager
def ctrl_c_raises():
    """Within the block, SIGINT raises KeyboardInterrupt in this process, as in a script run
    from a terminal: Python's own handler (``signal.default_int_handler``) is installed, and
    the one before it restored afterwards. A test run in the background (``tox > log &``)
    inherits SIGINT ignored, and Python then installs no handler of its own: a Ctrl-C test
    must not depend on how the suite was launched."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


# The first lines of every child script that is sent a Ctrl-C (or sends one to itself): the
# same as ctrl_c_raises(), for the script's whole life. (Its spawn workers, exec'ed from a
# process that handles SIGINT, start with the default disposition, as in a terminal.)
CTRL_C_RAISES = textwrap.dedent("""
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
""")


@contextlib.contextmanager
def interrupt_after(delay: float, how: str = "signal"):
    """Interrupt the main thread (:func:`interrupt_main_thread`) ``delay`` s into the
    block, with SIGINT handled as in a terminal for the block (:func:`ctrl_c_raises`).
    Yields a list that gets the ``time.monotonic()`` of the interrupt once sent."""
    sent: list = []

    def fire():
        sent.append(time.monotonic())
        interrupt_main_thread(how)

    with ctrl_c_raises():
        timer = threading.Timer(delay, fire)
        try:
            timer.start()
            yield sent
        finally:
            timer.cancel()
            timer.join()


def wait_until(cond, bound: float, period: float = 0.05) -> bool:
    """Poll ``cond()`` every ``period`` s for up to ``bound`` s; whether it came true."""
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(period)
    return True


def read_until_ready(proc, deadline: float) -> dict:
    """Read a child script's stdout until it prints READY: ``{first word: [the other words
    of every such line]}`` (e.g. "SHM <name>" and "PIDS <pid> <pid>" lines). Kills the
    script and raises AssertionError if READY does not come by ``deadline``."""
    lines: dict = {}
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            lines = {}
            for line in buf.decode().splitlines():
                key, _, rest = line.partition(" ")
                lines.setdefault(key, []).extend(rest.split())
            if "READY" in lines:
                return lines
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise AssertionError(f"the script did not get ready: {buf!r} {proc.stderr.read()!r}")
