"""The worker pool: processes, their pipes, semaphores, liveness and close. Knows no batches.

Imports buffers, collector (the beat's words), errors and internals. Nothing else in the
package touches a pipe, a process sentinel or a semaphore. What crosses, and when (parent P,
worker w)::

    start    P: Process(target=worker_entry, PoolSpec.configs[w])    w -> P: Started()
             w: attaches the segment, runs PoolSpec.program(link, arrays, config),
                which builds its envs and says                          w -> P: Ready()
    command  P -> w: any picklable command (the program's own dataclasses, or Close())
             w -> P: Done(result) | Failed(error, traceback)
    step     w: writes its observations, releases obs_ready[w], waits on act_ready[w]
             P: waits on obs_ready of a group, writes actions, releases act_ready
    deadline w: writes [sequence, phase, step, env] into its beat (shared memory)
             P: reads the beats while it waits; a beat that stops moving in a phase with a
                deadline gets the worker's stack (STACK_SIGNAL) and the worker killed
    close    P -> w: Close(); w closes its envs and exits; then SIGTERM, then SIGKILL
    restart  (PoolSpec.max_restarts > 0) a failure is absorbed instead of raised: the
             worker is stopped and put out (waits skip it); replace_out() starts its
             successor with PoolSpec.renew's config, the segment by file descriptor

Every wait in the parent is bounded and watches the workers' process sentinels; every wait
in a worker watches its parent. Errors raised here are :class:`WorkerError` naming the
worker, its envs and what happened.
"""
from __future__ import annotations

import atexit
import faulthandler
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from time import perf_counter
from typing import Any, Callable

from .buffers import SegmentFd, SharedBuffer, shm_space, size_text, views
from .collector import BEAT_PHASE, BEAT_SEQ, HANDED, IDLE
from .errors import RemoteTraceback, SamplerError, WorkerError, close_all, quietly, where_text
from .internals import drop_semaphore_name, remove_arena_files

sched_yield = getattr(os, "sched_yield", lambda: None)  # not on every platform

__all__ = ["Started", "Ready", "Done", "Failed", "Close", "PoolSpec", "Pool", "Resources", "Link",
           "Failure", "worker_entry", "acquire", "sigint_blocked", "start_method_of",
           "unpicklable"]

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a waiting worker checks that its parent is alive
# Per-step waits first retry the semaphore without blocking for a short while, yielding the
# CPU between tries: a process put to sleep takes tens of microseconds to wake (more on VMs),
# longer than an action-server step. A worker waits for actions (the agent's time plus the
# handoff): SPIN_S covers that. The parent waits for observations, i.e. for envs to step,
# and a parent spinning that long takes a core from the very workers it waits for (measured
# here: gpu on CartPole-v1, 2 cores, parent spin 100 us: 0.77-0.90x the env alone; 20 us or
# none: 0.91-1.06x), so it spins only PARENT_SPIN_S.
SPIN_S = 100e-6
PARENT_SPIN_S = 20e-6
# With a deadline, the parent looks at the workers' beats at least this often: a stuck env
# is reported within its deadline + DEADLINE_POLL_S (+ STACK_WAIT_S for its stack).
DEADLINE_POLL_S = 0.25
# A batch-level wait wakes at least this often to see whether another thread closed the
# pool (a closed pipe does not wake a wait already in progress).
GATHER_POLL_S = 1.0
# The signal that makes a worker's faulthandler write every thread's stack to its pipe.
STACK_SIGNAL = getattr(signal, "SIGUSR1", None)
# How long a stuck worker gets to write its stack (faulthandler writes it from the signal
# handler, in microseconds: only a stopped process takes this long), and how long the
# parent waits for more once some has come.
STACK_WAIT_S = 0.5
STACK_QUIET_S = 0.05
STACK_READ_BYTES = 65536  # one read of the stack pipe (a pipe's default capacity)
# int64 words per worker beat: 4 used, padded to a 64-byte cache line so that workers
# writing their beats at every env step never share one.
BEAT_WORDS = 8
# What a worker must not inherit from its parent's environment, lest it believe it is a
# rank of the parent's launch: torchrun's, Slurm's and MPI's variables that give a
# process its rank, world size or rendezvous (stripped while workers start).
LAUNCHER_VARIABLES = frozenset((
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS", "SLURM_NPROCS",
    "SLURM_STEP_NUM_TASKS", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"))
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_")
# A worker found dead may have sent its error report just before exiting: how long the
# parent looks for it on the pipe before reporting the death alone.
REPORT_WAIT_S = 0.2
# How long the parent waits for a dead worker's exit code (it is being reaped) before
# reporting "stopped answering" without one.
EXIT_CODE_WAIT_S = 0.5
# A worker stopped with SIGTERM (every path but a graceful close) unwinds to its env.close()
# calls: it gets this long to finish them before SIGKILL. Enough to stop and reap a
# simulator's process; short, because a fault or a Ctrl-C waits for it (healthy workers take
# milliseconds: only an env stuck in C code or a slow close() waits).
TERMINATE_GRACE_S = 2.0
# A SIGKILLed process is gone once the kernel has torn it down; the wait for that is bounded
# all the same, for a process stuck in uninterruptible sleep (a hung NFS read, say).
KILL_WAIT_S = 5.0


# -- messages -------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    """w -> P, first thing: the process got past multiprocessing's start-up."""


@dataclass(frozen=True)
class Ready:
    """w -> P: the program built its state and waits for commands."""


@dataclass(frozen=True)
class Done:
    """w -> P: a command finished; ``result`` is what the program returned."""

    result: Any = None


@dataclass(frozen=True)
class Failed:
    """w -> P: the worker raised; ``traceback`` is the formatted remote traceback."""

    error: BaseException
    traceback: str


@dataclass(frozen=True)
class Close:
    """P -> w: close the envs and exit."""


@dataclass
class PoolSpec:
    """What a pool starts: ``program(link, arrays, config)`` in each worker, with its own
    ``configs[w]``; ``arrays`` are views of the shared segment ``shared`` laid out as
    ``placed`` (``{}`` without a segment)."""

    program: Callable[..., None]
    configs: list                      # one per worker (cloudpickled unless forked)
    shared: SharedBuffer | None
    placed: dict
    labels: list                       # per worker, how messages name it
    envs: list                         # per worker, the global env indices it runs
    start_method: str | None = None
    name: str = "sampling"             # process names: f"{name}-worker-{w}"
    beats: Any = None                  # [W, BEAT_WORDS] int64 array: workers have deadlines
    deadline: Callable[[int], float | None] = lambda phase: None  # seconds for a phase
    stuck: Callable[..., str] = field(default=lambda w, phase, t, j, limit: "")
    close_timeout: float = 5.0
    # Restarts: how many worker failures the pool absorbs in all (0: every failure raises),
    # and renew(w, k), the config of worker w's k-th replacement. A replacement maps the
    # segment through its file descriptor (shared.fd): the name is gone by then.
    max_restarts: int = 0
    renew: Callable[[int, int], Any] | None = None


@dataclass
class Failure:
    """A worker failure the pool absorbed (see :meth:`Pool.take_failures`): the error it
    would have raised, the worker's beat then (``(sequence, phase, step, env)``: where it
    was), and the restart count of its replacement."""

    worker: int
    error: WorkerError
    beat: tuple | None
    restart: int

    @property
    def step(self) -> int | None:
        """The batch row the error itself names, where it says (a value found bad after
        the step it came from: see collector.end_batch)."""
        return getattr(self.error.__cause__, "sampling_step", None)


class Resources:
    """Everything a sampler (or a vector env) must release: its pool, its shared segment,
    the envs it built in this process. ``close`` is idempotent and finishes whatever
    interrupts it; it raises nothing but such an interruption (KeyboardInterrupt), after
    the release is complete."""

    def __init__(self):
        self.pool = Pool()
        self.shared: SharedBuffer | None = None
        self.envs: list = []  # the envs built in this process (serial's, a spare eval env)
        self._lock = threading.RLock()  # one close at a time (shutdown() may come from any thread)

    def close(self, graceful: bool = True) -> None:
        interrupt, failures = None, 0
        with self._lock:
            while failures < 2:  # a bug (not an interruption) is retried once
                try:
                    self._release(graceful)
                    break
                except BaseException as e:  # noqa: B036 - a Ctrl-C: finish first, raise after
                    if interrupt is None:
                        interrupt = e
                    graceful = False
                    failures += isinstance(e, Exception)
        if interrupt is not None:
            raise interrupt

    def _release(self, graceful: bool) -> None:
        """Release everything. Each step drops what it released only once it is released,
        so a step interrupted (by KeyboardInterrupt) can simply be run again."""
        self.pool.stop(graceful)
        with sigint_blocked():
            if self.shared is not None:
                self.shared.close_fd()
                self.shared.unlink()
                self.shared = None
        close_all(self.envs)

    def track(self, owner: Any) -> weakref.finalize:
        """Close these (forced) when ``owner`` is garbage collected or the interpreter
        exits with it open; the finalizer, which a normal close detaches. The pool's waits
        call ``owner._check_open()`` (through a weak reference: a pool holds no reference
        to its owner, which the finalizer must be able to collect)."""
        ref = weakref.ref(owner)

        def closed() -> None:
            live = ref()
            if live is not None:
                live._check_open()
        self.pool.closed = closed
        _open.add(owner)
        return weakref.finalize(owner, self.close, False)


# Owners (samplers, vector envs) not closed yet. multiprocessing's exit hook SIGTERMs
# daemonic children and then joins them with no time limit: a worker still closing a stuck
# env would hang the interpreter's exit. This hook, registered after multiprocessing's
# (imported above; atexit runs hooks last-in first-out), runs first and closes them with the
# bounded close.
_open: weakref.WeakSet = weakref.WeakSet()


def _close_at_exit() -> None:
    for owner in list(_open):
        owner._finalizer()


atexit.register(_close_at_exit)


# -- the parent's side ------------------------------------------------------------------
class Pool:
    """Worker processes running one program. Made empty, then :meth:`start`; :meth:`stop`
    is idempotent and may be run again after an interruption."""

    def __init__(self):
        self.procs: list = []
        self.conns: list = []
        self.sems: list = []        # per worker (obs_ready, act_ready): the handoff
        self.stack_pipes: list = []  # per worker, where its stack comes, with deadlines
        self.started: set = set()   # workers whose Started came (a later death is no
        #                             start-up failure)
        self.spec: PoolSpec | None = None
        self.closed: Callable[[], None] = lambda: None  # raises if the owner was closed
        self._watch: dict = {}  # worker -> (its beat, when the parent first saw it)
        # Restarts: workers out (failed, absorbed, not yet replaced), absorbed failures not
        # yet taken, restarts left, each worker's restart count, and the worker a wait is
        # for (a failure absorbed meanwhile ends that wait: see _Gone).
        self.out: set = set()
        self.failures: list = []
        self.budget = 0
        self.restarts: list = []
        self._awaiting: int | None = None
        self._early: dict = {}  # worker -> a Done that check() read before gather()
        # The same-failure rule (see _fail): per worker, how its last absorbed failure
        # looked, and whether the replacement has finished a command since.
        self._last_failure: dict = {}
        self._proven: set = set()

    @property
    def size(self) -> int:
        return len(self.procs)

    def start(self, spec: PoolSpec) -> None:
        """Start one process per config and wait until each is Ready (replacing those
        that fail, within the restart budget)."""
        self.spec = spec
        self.method = start_method_of(spec.start_method)
        self.ctx = mp.get_context(self.method)
        self.poll_s = GATHER_POLL_S if spec.beats is None else DEADLINE_POLL_S
        self.budget = spec.max_restarts
        self.restarts = [0] * len(spec.configs)
        for w, cfg in enumerate(spec.configs):
            self.procs.append(None)
            self.conns.append(None)
            self.sems.append(None)
            if spec.beats is not None and STACK_SIGNAL is not None:
                self.stack_pipes.append(None)
            self._spawn(w, cfg, spec.shared and spec.shared.name)
        self.gather(range(self.size), Ready)
        self.drop_names()  # every worker has opened them: nothing can leak them now
        self.replace_out()
        log.debug("%s: %d workers started (%s)", spec.name, self.size, self.method)

    def _spawn(self, w: int, cfg: Any, segment: Any) -> None:
        """Start worker w's process with ``cfg``; ``segment``: the shared segment's name,
        or a SegmentFd once the name is gone."""
        ctx, spec = self.ctx, self.spec
        payload = cfg if self.method == "fork" else _dumps(cfg)
        self._hand(w, IDLE)  # a replacement starts idle, not where its predecessor was
        parent_conn, child_conn = ctx.Pipe()
        sems = (ctx.Semaphore(0), ctx.Semaphore(0))  # the per-step handoff
        self.sems[w] = sems  # named (spawn, forkserver): see drop_names
        stack_out = None
        if self.stack_pipes:
            self.stack_pipes[w], stack_out = ctx.Pipe(duplex=False)
        nbytes = spec.shared.nbytes if spec.shared is not None else 0
        p = ctx.Process(target=worker_entry, name=f"{spec.name}-worker-{w}", daemon=True,
                        args=(w, spec.program, payload, segment, nbytes, spec.placed,
                              child_conn, *sems, stack_out))
        self.conns[w] = parent_conn
        with _without_launcher_env(), sigint_blocked():
            p.start()
        self.procs[w] = p
        child_conn.close()
        if stack_out is not None:
            stack_out.close()

    # -- restarts --------------------------------------------------------------------
    def replace_out(self) -> list:
        """Start a new process for every worker that is out (its restart count one more),
        each with a config from ``spec.renew``, and wait until they are Ready; those that
        fail to start are replaced in turn, within the budget. Returns the workers
        replaced."""
        done = []
        while self.out:
            w = min(self.out)
            self.out.discard(w)
            self._watch.pop(w, None)
            self.started.discard(w)
            quietly(self.conns[w].close)
            if self.stack_pipes:
                quietly(self.stack_pipes[w].close)
            shared = self.spec.shared
            self._spawn(w, self.spec.renew(w, self.restarts[w]),
                        SegmentFd(shared.fd) if shared is not None else None)
            try:
                self.gather([w], Ready)  # a failure here puts it out again (or raises)
            finally:  # opened by the worker, or never to be: no name may outlive this
                for sem in self.sems[w]:
                    drop_semaphore_name(sem)
            done.append(w)
        return done

    def take_failures(self) -> list:
        """The failures absorbed since the last call (:class:`Failure`)."""
        out, self.failures = self.failures, []
        return out

    def _fail(self, w: int, msg: Any = None, error: BaseException | None = None) -> None:
        """Worker w failed: absorb it (the worker is stopped and put out, to be replaced
        by :meth:`replace_out`) while the budget lasts; else raise its error."""
        if error is None:
            error = self._error(w, msg)
        if not isinstance(error, WorkerError) or self.budget <= 0:
            raise error
        beats = self.spec.beats
        beat = tuple(beats[w, :4].tolist()) if beats is not None else None
        # The same-failure rule: a replacement that raises the same error at the same
        # point (phase and step) as the failure it replaced, before it finished a single
        # command, fails deterministically (a configuration bug, not a transient fault):
        # replacing it again would only spend the budget. Deaths are always absorbed.
        cause = error.__cause__
        key = None if cause is None else (type(cause).__name__, str(cause),
                                          None if beat is None else beat[1:3])
        if key is not None and w not in self._proven and self._last_failure.get(w) == key:
            raise WorkerError(f"{error} It is not absorbed (max_restarts): its replacement "
                              f"failed the same way at the same point before finishing a "
                              f"command, so the failure is deterministic",
                              w, error.envs, error.exitcode, error.remote_traceback) from cause
        self._last_failure[w] = key
        self._proven.discard(w)
        self.budget -= 1
        self.restarts[w] += 1
        tb = error.remote_traceback or ""
        log.warning("restarting worker %d (%d restart%s left) after this failure:\n"
                    "%s%s", w, self.budget, "" if self.budget == 1 else "s", tb, error)
        _stop([self.procs[w]])  # a raising worker is exiting anyway: this bounds it
        self.out.add(w)
        self.failures.append(Failure(w, error, beat, self.restarts[w]))

    # -- commands --------------------------------------------------------------------
    def send(self, command: Any) -> None:
        """Send ``command`` to every worker."""
        # A Ctrl-C in the middle of a send would leave half a message in the pipe (and a
        # pickling buffer that CPython 3.13 complains about): let it land after the sends.
        with sigint_blocked():
            failed = []
            for w, c in enumerate(self.conns):
                if w in self.out:
                    continue
                self._hand(w)
                try:
                    c.send(command)
                except (BrokenPipeError, ConnectionResetError, EOFError):
                    failed.append(w)
                    if not self.budget:
                        break
        for w in failed:
            self._fail(w)

    def gather(self, workers, expect: type = Done) -> dict:
        """Wait for one ``expect`` message from each of ``workers``; ``{w: result}``.
        Fails fast (WorkerError) on any worker's error report or death."""
        # Replies check() read early, then the workers still to hear from.
        out = {w: self._early.pop(w).result for w in workers
               if w not in self.out and w in self._early}
        pending = {self.conns[w]: w for w in workers if w not in self.out and w not in out}
        while pending:
            self.closed()  # the owner was closed from another thread: stop waiting
            sentinels = {self.procs[w].sentinel: w for w in pending.values()}
            ready = mp_connection.wait(list(pending) + list(sentinels), timeout=self.poll_s)
            if not ready:
                self.check_deadlines()
            for obj in ready:
                if obj in pending:
                    w = pending[obj]
                    msg = self._recv(w)
                    if msg is None:
                        continue  # only Started: still pending
                    del pending[obj]
                    if not isinstance(msg, expect):
                        self._fail(w, msg)
                        continue
                    if isinstance(msg, Done):
                        self._proven.add(w)
                    out[w] = getattr(msg, "result", None)
            for obj in ready:
                w = sentinels.get(obj)
                if w is not None and self.conns[w] in pending:
                    del pending[self.conns[w]]
                    self._fail(w)
            # Workers absorbed meanwhile (a deadline) are waited for no more.
            pending = {c: w for c, w in pending.items() if w not in self.out}
        return out

    def _recv(self, w: int, wait: float = 0.0) -> Any:
        """The next message of worker w past its Started: None if only that came (within
        ``wait`` seconds of each message), ``_DEAD`` if the pipe closed, a Failed stand-in
        for a message that would not unpickle."""
        conn = self.conns[w]
        try:
            if wait and not conn.poll(wait):
                return None
            msg = conn.recv()
            # A worker's first message says its process started; what it was asked for may
            # be right behind it.
            while isinstance(msg, Started):
                self.started.add(w)
                if not conn.poll(wait):
                    return None
                msg = conn.recv()
        except (EOFError, OSError):  # the pipe closed: the worker died; its exit code tells
            return _DEAD
        except Exception as e:  # a message that won't unpickle
            return Failed(SamplerError(f"its message could not be unpickled in the parent "
                                       f"({type(e).__name__}: {e})"),
                          "(no traceback: the message itself was unreadable)")
        return msg

    # -- the per-step handoff --------------------------------------------------------
    def wait_obs(self, workers) -> None:
        """Wait until each of ``workers`` has written this step's observations."""
        sems, check = self.sems, self.check
        if not self.budget and not self.out:  # the usual case: no restarts
            for w in workers:
                acquire(sems[w][0], check, PARENT_SPIN_S)
            return
        for w in workers:
            if w in self.out:
                continue
            self._awaiting = w
            try:
                acquire(sems[w][0], check, PARENT_SPIN_S)
            except _Gone:  # it failed and is out: its columns wait for the sampler
                pass
            finally:
                self._awaiting = None

    def release(self, workers) -> None:
        """Let ``workers`` step with the actions written."""
        sems, out, beats = self.sems, self.out, self.spec.beats
        for w in workers:
            if w not in out:
                if beats is not None:
                    self._hand(w)
                sems[w][1].release()

    def _hand(self, w: int, phase: int = HANDED) -> None:
        """Mark worker w HANDED before it gets a command or a step's actions: a phase with
        a deadline, which the worker leaves when it takes them up. Without it, a worker
        that stopped (SIGSTOP) while waiting for this process would look like it is still
        waiting, with no deadline, forever. The worker writes its beat only once it has
        taken them up, so the two never write at once. (A new worker is marked ``phase``
        IDLE, not where its predecessor was.)"""
        beats = self.spec.beats
        if beats is not None:
            beats[w, BEAT_PHASE] = phase
            beats[w, BEAT_SEQ] += 1

    def check(self) -> None:
        """Raise if a worker reported an error or died (or the owner was closed)."""
        self.closed()
        # Reports and deaths first: a worker that raised is not also a stuck one.
        for w, (p, c) in enumerate(zip(self.procs, self.conns)):
            if w in self.out or w in self._early:
                continue
            if c.poll():
                msg = self._recv(w)
                if isinstance(msg, Done):  # finished its batch before the others (alternating)
                    self._early[w] = msg
                    self._proven.add(w)
                elif msg is not None:
                    self._fail(w, msg)
            elif p.exitcode is not None:
                self._fail(w)
        self.check_deadlines()
        if self._awaiting is not None and self._awaiting in self.out:
            raise _Gone  # the worker this wait is for failed (and was absorbed)

    # -- deadlines -------------------------------------------------------------------
    def check_deadlines(self) -> None:
        """Raise for a worker whose beat has not moved for longer than its phase's
        deadline (a worker waiting for the parent has none)."""
        beats = self.spec.beats if self.spec is not None else None
        if beats is None:
            return
        now = time.monotonic()
        for w in range(self.size):
            if w in self.out:
                continue
            seq, phase, t, j = beats[w, :4].tolist()
            limit = self.spec.deadline(phase)
            if limit is None:
                self._watch.pop(w, None)
                continue
            seen = self._watch.get(w)
            if seen is None or seen[0] != (seq, j):
                self._watch[w] = ((seq, j), now)
            elif now - seen[1] > limit:
                self._fail(w, error=self._stuck_error(w, phase, t, j, limit))

    def _stuck_error(self, w: int, phase: int, t: int, j: int, limit: float) -> WorkerError:
        proc = self.procs[w]
        stack = _stack_of(proc, self.stack_pipes[w]) if self.stack_pipes else None
        quietly(proc.kill)
        where = (f"Its Python stack when the parent gave up (every thread, most recent call "
                 f"first):\n{stack}" if stack else
                 f"It did not respond to {_signame(STACK_SIGNAL)} within {STACK_WAIT_S:g} s, so "
                 f"there is no stack: the process is stopped (SIGSTOP, a debugger) or blocked "
                 f"in the kernel")
        what = self.spec.stuck(w, phase, t, j, limit)
        return WorkerError(f"{self.spec.labels[w]}: {what}; the worker was killed. {where}",
                           w, self.spec.envs[w], None, stack)

    # -- errors ----------------------------------------------------------------------
    def _error(self, w: int, msg: Any = None) -> BaseException:
        """The error for worker w's failure: a WorkerError from its error report (``msg``
        or one on its pipe), or else from its death."""
        self.closed()  # workers stopped by a close from another thread are no failure
        proc = self.procs[w]
        if msg is None:  # an error report may be just behind the exit
            msg = self._recv(w, REPORT_WAIT_S)
        if msg is _DEAD:
            msg = None
        head, envs = self.spec.labels[w], self.spec.envs[w]
        if isinstance(msg, Failed):
            cause = msg.error
            cause.__cause__ = RemoteTraceback(msg.traceback)
            name = getattr(cause, "sampling_type", None) or type(cause).__name__
            err = WorkerError(f"{head} raised {name}: {cause}{where_text(cause)}; its "
                              f"traceback is shown above and in .remote_traceback",
                              w, envs, None, msg.traceback)
            err.__cause__ = cause
            return err
        if msg is not None:
            return SamplerError(f"{head} sent {msg!r} out of turn (a bug in the sampler)")
        proc.join(EXIT_CODE_WAIT_S)
        return WorkerError(self._death_text(w, head, proc.exitcode), w, envs, proc.exitcode,
                           None)

    def _death_text(self, w: int, head: str, code: int | None) -> str:
        if code is None:
            how = "stopped answering (its pipe closed)"
        elif code < 0:
            how = f"was killed by signal {_signame(-code)}"
        else:
            how = f"exited with code {code}"
        shared = self.spec.shared
        if code is not None and code < 0 and -code == getattr(signal, "SIGBUS", None) and shared:
            return _sigbus_text(head, how, shared.nbytes, shared.reserved)
        if code is not None and w not in self.started:
            return _startup_failure(head, how, code, self.method)
        return (f"{head} {how} without reporting an error; if nothing killed it, check the "
                f"system log for the out-of-memory killer or look for os._exit/sys.exit in "
                f"the env")

    # -- close -----------------------------------------------------------------------
    def stop(self, graceful: bool) -> None:
        """Stop every worker (asking first if ``graceful``) and close the pipes. Each step
        drops what it released only once it is released, so an interrupted stop (Ctrl-C)
        can simply be run again."""
        procs = [p for p in self.procs if p is not None]
        if graceful and procs:
            # The one part a Ctrl-C may cut short: the rest is forced, with SIGINT held back
            # (in this thread; one delivered to another thread is caught by the caller).
            # Ask every worker to close its envs and exit; wait close_timeout s in all.
            for c in self.conns:
                with suppress(Exception):
                    c.send(Close())
            deadline = time.monotonic() + self.spec.close_timeout
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        with sigint_blocked():
            _stop(procs)
            self.procs = []
            for c in self.conns + self.stack_pipes:
                if c is not None:
                    quietly(c.close)
            self.conns, self.stack_pipes = [], []
            self.drop_names()
            self.sems = []

    def drop_names(self) -> None:
        """Unlink the semaphores' names: every process that uses them has opened them, and a
        name is the one thing that outlives every process."""
        for pair in self.sems:
            for sem in pair or ():
                drop_semaphore_name(sem)


class _Gone(Exception):
    """Ends a wait for a worker whose failure was absorbed meanwhile (see Pool._fail)."""


# What _recv returns for a pipe that closed under it: the worker died.
_DEAD = object()


def _stop(procs: list) -> None:
    """End every process in ``procs``: SIGTERM (a worker then closes its envs), at most
    TERMINATE_GRACE_S for all of them, then SIGKILL; then remove what a process stopped
    mid-statement may have left in /dev/shm (internals.remove_arena_files)."""
    live = [p for p in procs if p.exitcode is None]
    for p in live:
        quietly(p.terminate)
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for p in live:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in live:
        if p.exitcode is None:
            quietly(p.kill)
    deadline = time.monotonic() + KILL_WAIT_S
    for p in live:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            log.warning("worker process %d did not end %.0f s after SIGKILL",
                        p.pid, KILL_WAIT_S)
    for p in procs:
        if p.exitcode is not None:
            remove_arena_files(p.pid)


def _dumps(obj: Any) -> bytes:
    import cloudpickle
    return cloudpickle.dumps(obj)


def start_method_of(method: str | None) -> str:
    """The start method workers get: ``method``, else the one the program set, else the
    platform's default (the first of ``get_all_start_methods()``: fork on Linux before
    3.14, forkserver from 3.14). Never ``mp.get_context()``, which would pin the global
    context and make the program's own ``set_start_method`` fail."""
    return method or mp.get_start_method(allow_none=True) or mp.get_all_start_methods()[0]


def unpicklable(obj: Any) -> Exception | None:
    """Why ``obj`` cannot be sent to a spawn/forkserver worker (cloudpickle's error), or
    None if it can."""
    try:
        _dumps(obj)
    except Exception as e:
        return e
    return None


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


@contextmanager
def sigint_blocked():
    """Hold SIGINT back in this thread (it is delivered when the block ends)."""
    # Around p.start() it also protects the child, which inherits the mask (across exec
    # too) and keeps SIGINT blocked until worker_entry ignores it: a Ctrl-C while a spawn
    # worker still imports the main module cannot kill it.
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _launcher_variable(name: str) -> bool:
    return name in LAUNCHER_VARIABLES or name.startswith(LAUNCHER_PREFIXES)


@contextmanager
def _without_launcher_env():
    # A launcher's variables make a child believe it is a rank: it would MPI_Init (and hang)
    # or join torch.distributed's group as its parent. Workers are not ranks.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if _launcher_variable(k)}
    try:
        yield
    finally:
        os.environ.update(saved)


def _sigbus_text(head: str, how: str, nbytes: int, reserved: bool) -> str:
    """The message for a worker killed by SIGBUS: a memory-mapped page that could not be
    backed. Where the segment's pages were reserved at creation, not the sampler's."""
    space = shm_space()
    free = f"; /dev/shm has {size_text(space[0])} free" if space else ""
    if reserved:
        return (f"{head} {how}: a page of memory-mapped shared memory or file could not be "
                f"backed. The sampler's own segment ({size_text(nbytes)}) had its space "
                f"reserved at start-up, so look for an env that maps files or shared memory "
                f"of its own (in /dev/shm, full in a container: Docker's --shm-size){free}")
    return (f"{head} {how}: most likely /dev/shm ran out of space, so a page of the "
            f"sampler's shared-memory segment ({size_text(nbytes)}) could not be backed"
            f"{free}. Give /dev/shm more room (in Docker: --shm-size) or make the batch "
            f"smaller (batch_T, batch_B, eval_n_envs); an env that maps files or shared "
            f"memory of its own can cause it too")


def _startup_failure(head: str, how: str, code: int, method: str) -> str:
    """The message for a worker that died before worker_entry's first statement ran."""
    if code < 0:
        return (f"{head} {how} while its process was starting ({method!r} start method), "
                f"before running any sampling code; if nothing killed it, check the system "
                f"log for the out-of-memory killer")
    fork = ("" if method == "fork" else
            ", or use start_method='fork' where available (not on Windows)")
    return (f"{head} {how} while its process was starting ({method!r} start method), before "
            f"running any sampling code; the cause is printed on the worker's stderr above. "
            f"Usually the child could not import the main module: a script without an "
            f"`if __name__ == \"__main__\":` guard (spawn and forkserver workers re-run the "
            f"script, and multiprocessing stops them in its bootstrapping phase), a script run "
            f"from stdin (`python - < script.py`) or a notebook cell (there is no file to "
            f"re-import), or a main module that fails when imported in the child. Fix: put the "
            f"script's top-level code under `if __name__ == \"__main__\":`, define env_fn and "
            f"the agent in an importable module{fork}")


def _stack_of(proc: Any, pipe: Any) -> str | None:
    """Ask a worker for its Python stack (STACK_SIGNAL -> faulthandler -> ``pipe``)."""
    try:
        os.kill(proc.pid, STACK_SIGNAL)
    except OSError:
        return None
    data, deadline = b"", time.monotonic() + STACK_WAIT_S
    with suppress(OSError):
        while True:
            wait = deadline - time.monotonic() if not data else STACK_QUIET_S
            if wait <= 0 or not pipe.poll(wait):
                break
            chunk = os.read(pipe.fileno(), STACK_READ_BYTES)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip() or None


# -- the worker's side ------------------------------------------------------------------
def acquire(sem, check, spin: float = SPIN_S) -> None:
    """Acquire ``sem``: spin up to ``spin`` s, then sleep, calling ``check()`` (which may
    raise) between sleeps."""
    if sem.acquire(False):
        return
    deadline = perf_counter() + spin
    while perf_counter() < deadline:
        sched_yield()
        if sem.acquire(False):
            return
    while not sem.acquire(timeout=POLL_S):
        check()


class ParentGone(Exception):
    """The worker's parent died: the worker exits quietly (closing its envs)."""


class Terminated(BaseException):
    """Raised in a worker by SIGTERM (the parent stopping it, or anyone else): it unwinds
    to ``worker_entry``'s ``finally``, which closes the envs. A BaseException, so that an
    env's ``except Exception`` cannot swallow it."""


class Link:
    """A worker's end of the pool: commands, replies, the per-step handoff, its beat,
    and ``envs``, the envs it has built (closed whatever way the worker ends)."""

    def __init__(self, conn, obs_ready, act_ready, beat):
        self.conn, self.obs_ready, self.act_ready = conn, obs_ready, act_ready
        self.beat = beat  # a memoryview of int64 [sequence, phase, step, env], or None
        self.envs: list = []
        self.ppid = os.getppid()
        self.parent = mp.parent_process()

    def check_parent(self) -> None:
        if os.getppid() != self.ppid or (self.parent is not None and not self.parent.is_alive()):
            raise ParentGone

    def recv(self) -> Any:
        """The next command (watching the parent while waiting)."""
        while not self.conn.poll(POLL_S):
            self.check_parent()
        return self.conn.recv()

    def send(self, reply: Any) -> None:
        self.conn.send(reply)

    def exchange(self) -> None:
        """Tell the parent this step's observations are written; wait for its actions."""
        self.obs_ready.release()
        acquire(self.act_ready, self.check_parent)


# True once the worker is closing its envs (or a SIGTERM already started that): later
# SIGTERMs are ignored so that nothing interrupts an env's close(); the parent kills the
# worker with SIGKILL if closing takes longer than its grace period.
_closing = False


def _on_sigterm(signum, frame) -> None:
    global _closing
    if _closing:
        return
    _closing = True
    raise Terminated


def worker_entry(w: int, program: Callable, payload: Any, shm_name: str | None, nbytes: int,
                 placed: dict, conn, obs_ready, act_ready, stack_pipe=None) -> None:
    """Entry point of worker ``w``: runs ``program(link, arrays, config)``; reports any
    error with its traceback; closes the envs on every way out."""
    # First of all, say that the process got this far: a worker that dies before this
    # message failed in multiprocessing's start-up (importing the main module under
    # spawn/forkserver, unpickling its arguments), and the parent says so.
    try:
        conn.send(Started())
    except OSError:  # the parent is gone already
        return
    global _closing
    _closing = False
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # Again here: a forkserver started earlier (by anything) hands its children the
    # environment it had then, launcher variables included.
    for k in [k for k in os.environ if _launcher_variable(k)]:
        del os.environ[k]
    link = Link(conn, obs_ready, act_ready, None)
    terminated = False
    try:
        # SIGTERM (how the parent stops a worker on every path but a graceful close, and
        # how schedulers stop jobs) unwinds to the finally below, which closes the envs. A
        # worker in a blocking C call gets it when the call returns; one that never
        # returns is SIGKILLed by the parent after TERMINATE_GRACE_S.
        signal.signal(signal.SIGTERM, _on_sigterm)
        if hasattr(signal, "pthread_sigmask"):  # the parent started us with SIGINT blocked
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if isinstance(payload, bytes):  # cloudpickled (cloudpickle.loads is pickle.loads)
            payload = pickle.loads(payload)
        arrays = views(SharedBuffer(nbytes, name=shm_name).buf, placed) if shm_name else {}
        if "beats" in arrays:
            link.beat = memoryview(arrays["beats"][w])
        if stack_pipe is not None:  # the stack on STACK_SIGNAL, from C: even when stuck in C
            faulthandler.register(STACK_SIGNAL, file=stack_pipe.fileno(), all_threads=True)
        program(link, arrays, payload)
    except ParentGone:
        pass
    except Terminated:
        terminated = True
    except BaseException as e:  # noqa: B036 - everything must reach the parent
        try:
            _report(conn, e)
        except Terminated:
            terminated = True
    finally:
        _closing = True  # from here on SIGTERM is ignored: nothing interrupts env.close()
        close_all(link.envs)
    if terminated:
        _die_of_sigterm()


def _die_of_sigterm() -> None:
    """Die of SIGTERM as the default action would have: the exit status says so, and the
    parent's error (for a SIGTERM it did not send) names the signal."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):  # None, or closed
            stream.flush()
    os.kill(os.getpid(), signal.SIGTERM)


class RemoteError(Exception):
    """Stands in for a worker's exception that cannot cross the pipe (it does not pickle,
    or would not unpickle): its message, with the original's type name and tags."""


def _report(conn, e: BaseException) -> None:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        # Some exceptions pickle but fail to unpickle (custom __init__ signatures): check here,
        # where a stand-in can still carry the message and the traceback.
        pickle.loads(pickle.dumps(e))
    except Exception:
        stand_in = RemoteError(str(e))
        stand_in.sampling_type = type(e).__name__
        for tag in ("sampling_where", "sampling_step"):
            setattr(stand_in, tag, getattr(e, tag, None))
        e = stand_in
    with suppress(Exception):  # the pipe is gone: the parent learns from the exit code
        conn.send(Failed(e, tb))
