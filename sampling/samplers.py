"""One sampler class for every kind; a kind is a row of :data:`KINDS`.

Imports buffers, agents, collector and worker. The parent owns all resources
(processes, pipes, semaphores, the shared segment) in :class:`_Resources`, whose
``close`` runs on shutdown, on every error path and from a finalizer. The parent never
waits without a bound: batch-level waits watch the workers' pipes and process
sentinels, per-step waits poll worker liveness between semaphore time-outs.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from typing import Any, Callable, Iterator

import numpy as np

from .agent_state import Params, RngGuard, unmirrored_arrays
from .agents import AgentRunner, write_checked
from .buffers import (
    SharedBuffer,
    Spec,
    layout,
    no_memory_message,
    shm_space,
    size_text,
    spec_of,
    views,
)
from .collector import (
    AGENT,
    BATCH_RESET,
    DECORRELATE,
    EVAL,
    EVAL_MAKE,
    EVAL_RESET,
    IDLE,
    MAKE,
    RESET,
    STEP,
    Collector,
    TrajInfo,
    check_reset,
    check_step,
    env_action,
    make_env,
)
from .errors import RemoteTraceback, SamplerClosedError, SamplerError, WorkerError
from .kinds import KINDS, split
from .spaces import random_action_fn
from .tree import get, is_tree, path_text, to_numpy, tree_leaves, tree_map
from .worker import (
    PARENT_SPIN_S,
    STACK_SIGNAL,
    acquire,
    restart_eval,
    run_batch,
    run_eval,
    worker_main,
)

__all__ = ["Batch", "Sampler"]

log = logging.getLogger(__name__)


# With step_timeout, the parent looks at the workers' progress at least this often: a stuck
# env is reported within step_timeout + DEADLINE_POLL_S (+ STACK_WAIT_S for its stack).
DEADLINE_POLL_S = 0.25
# env_fn() builds a simulator (loads assets, compiles, connects): its deadline is this many
# times step_timeout.
ENV_FN_TIMEOUT_FACTOR = 10
# How long a stuck worker gets to write its stack after STACK_SIGNAL (faulthandler writes
# it from the signal handler, in microseconds: only a stopped process takes this long),
# and how long the parent waits for more once some has come.
STACK_WAIT_S = 0.5
STACK_QUIET_S = 0.05
# int64 words of progress marks per worker: 4 used, padded to a 64-byte cache line so that
# workers writing their marks at every env step never share one.
BEAT_WORDS = 8

# A worker found dead may have sent its error report just before exiting: how long the
# parent looks for it on the pipe before reporting the death alone.
REPORT_WAIT_S = 0.2
# A batch-level wait wakes at least this often to see whether another thread shut the
# sampler down (a closed pipe does not wake a wait already in progress).
GATHER_POLL_S = 1.0


class Batch(dict):
    """A batch: a dict of ``[T, B, ...]`` arrays (nested dicts for dict spaces) whose keys
    are also attributes. Arrays are views of the sampler's buffers, valid until the
    next batch; ``traj_infos`` lists the episodes that finished during this batch."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class Options:
    """Validated options (built by :func:`sampling.make_sampler`)."""

    batch_T: int
    batch_B: int
    n_workers: int
    seed: int
    reset_mode: str
    max_decorrelation_steps: int
    bootstrap_value: bool
    final_observation: bool
    discount: float
    traj_info: Callable[..., TrajInfo]
    eval_env_fn: Callable | None
    eval_n_envs: int
    eval_max_steps: int | None
    eval_max_trajectories: int | None
    start_method: str | None
    torch_threads: int | None
    cpu_affinity: list | None
    shutdown_timeout: float
    step_timeout: float | None = None


# A worker stopped with SIGTERM (every path but a graceful shutdown; see worker_main)
# unwinds to its env.close() calls: it gets this long to finish them before SIGKILL. Enough
# to stop and reap a simulator's process; short, because a fault or a Ctrl-C waits for it
# (healthy workers take milliseconds: only an env stuck in C code or a slow close() waits).
TERMINATE_GRACE_S = 2.0
# A SIGKILLed process is gone once the kernel has torn it down; the wait for that is bounded
# all the same, for a process stuck in uninterruptible sleep (a hung NFS read, say).
KILL_WAIT_S = 5.0


class _Resources:
    """Everything a sampler must release. ``close`` is idempotent and finishes whatever
    interrupts it; it raises nothing but such an interruption (KeyboardInterrupt), after
    the release is complete."""

    def __init__(self):
        self.procs: list = []
        self.conns: list = []
        self.sems: list = []
        self.shared: SharedBuffer | None = None
        self.envs: list = []
        self.stack_pipes: list = []  # with a step deadline: per worker, where its stack comes
        self.timeout = 5.0
        self._lock = threading.RLock()  # one close at a time (shutdown() may come from any thread)

    def close(self, graceful: bool = True) -> None:
        interrupt, failures = None, 0
        with self._lock:
            while True:
                try:
                    self._release(graceful)
                    break
                except BaseException as e:  # noqa: B036 - a Ctrl-C: finish first, raise after
                    if interrupt is None:
                        interrupt = e
                    graceful = False
                    if isinstance(e, Exception):  # a bug, not an interruption: retry once
                        failures += 1
                        if failures > 1:
                            break
        if interrupt is not None:
            raise interrupt

    def _release(self, graceful: bool) -> None:
        """Release everything. Each step drops what it released only once it is released,
        so a step interrupted (by KeyboardInterrupt) can simply be run again."""
        procs = self.procs
        if graceful and procs:
            # The one part a Ctrl-C may cut short: the rest is forced, with SIGINT held back
            # (in this thread; one delivered to another thread is caught by close()).
            _ask_to_close(self.conns, procs, self.timeout)
        with _sigint_blocked():
            _stop(procs)
            self.procs = []
            for c in self.conns + self.stack_pipes:
                _quietly(c.close)
            self.conns, self.stack_pipes = [], []
            self.drop_names()
            self.sems = []
            if self.shared is not None:
                self.shared.unlink()
                self.shared = None
        envs = self.envs  # the serial kind's envs, in this process
        while envs:
            close = getattr(envs.pop(0), "close", None)  # duck-typed envs may have none
            if close is not None:
                _quietly(close)

    def drop_names(self) -> None:
        """Unlink the names of the semaphores and the segment: every process that uses them
        has opened them, and a name is the one thing that outlives every process."""
        for pair in self.sems:
            for sem in pair:
                _drop_semaphore_name(sem)
        if self.shared is not None:
            self.shared.unlink()


# Samplers not closed yet. multiprocessing's exit hook SIGTERMs daemonic children and then
# joins them with no time limit: a worker still closing a stuck env would hang the
# interpreter's exit. This hook, registered after multiprocessing's (imported above, and
# atexit runs hooks last-in first-out), runs first and closes them with the bounded close.
_open: weakref.WeakSet = weakref.WeakSet()


def _close_at_exit() -> None:
    for sampler in list(_open):
        sampler._finalizer()


atexit.register(_close_at_exit)


def _ask_to_close(conns: list, procs: list, timeout: float) -> None:
    """Graceful shutdown: ask every worker to close its envs and exit; wait ``timeout`` s."""
    for c in conns:
        try:
            c.send(("close",))
        except Exception:
            pass
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def _stop(procs: list) -> None:
    """End every process in ``procs``: SIGTERM (a worker then closes its envs), at most
    TERMINATE_GRACE_S for all of them, then SIGKILL."""
    live = [p for p in procs if p.exitcode is None]
    for p in live:
        _quietly(p.terminate)
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for p in live:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in live:
        if p.exitcode is None:
            _quietly(p.kill)
    deadline = time.monotonic() + KILL_WAIT_S
    for p in live:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            log.warning("sampling: worker process %d did not end %.0f s after SIGKILL",
                        p.pid, KILL_WAIT_S)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.debug("sampling: ignored an error while closing", exc_info=True)


def _drop_semaphore_name(sem: Any) -> None:
    """Unlink a named semaphore's name now (spawn/forkserver; fork's have none). Processes
    that opened it keep using it; nothing is left in /dev/shm whatever happens later.

    CPython registers ``util.Finalize(sem, SemLock._cleanup, (name,))`` for every named
    semaphore (3.9-3.13): calling it runs sem_unlink and the resource tracker's unregister
    once and takes it off the exit-time registry, so nothing runs twice."""
    name = getattr(getattr(sem, "_semlock", None), "name", None)
    if not name:
        return
    from multiprocessing import synchronize, util
    cleanup = synchronize.SemLock._cleanup
    for fin in list(util._finalizer_registry.values()):
        if getattr(fin, "_callback", None) is cleanup and getattr(fin, "_args", None) == (name,):
            _quietly(fin)
            return


class Sampler:
    """Collects ``[batch_T, batch_B]`` batches from ``batch_B`` envs in the way of one kind.

    Made by :func:`sampling.make_sampler`; use it as a context manager (or call
    :meth:`shutdown`). Attributes: ``kind``, ``batch_T``, ``batch_B``, ``n_workers``.
    """

    def __init__(self, kind: str, env_fn: Callable, agent: Any, opts: Options):
        self.kind = kind
        self._k = KINDS[kind]
        self.batch_T, self.batch_B = opts.batch_T, opts.batch_B
        self.n_workers = opts.n_workers if self._k.workers else 0
        self._o = opts
        self._itr = 0
        self._eval_count = 0
        self._closed_reason: str | None = None
        self._busy = threading.Lock()  # held while a batch or an evaluation runs
        self._interrupted = False      # shutdown() came while another thread collected
        self._res = _Resources()
        self._res.timeout = opts.shutdown_timeout
        self._finalizer = weakref.finalize(self, self._res.close, False)
        _open.add(self)
        self._runner = AgentRunner(agent)
        try:
            self._setup(env_fn, agent)
        except BaseException:
            self._close(graceful=False, reason="its construction failed")
            raise

    # -- construction --------------------------------------------------------------------
    def _setup(self, env_fn: Callable, agent: Any) -> None:
        o, k = self._o, self._k
        T, B, E = o.batch_T, o.batch_B, o.eval_n_envs
        p = _probe(env_fn, self._runner, o.seed)
        self.observation_space, self.action_space = p.observation_space, p.action_space
        specs = {"main": _batch_specs(T, B, p, o.final_observation, o.bootstrap_value),
                 "ctrl": Spec((1,), "<i8")}  # ctrl[0]: the parent's "stop evaluating" flag
        if E:
            specs["eval"] = _batch_specs(1, E, p, False, False)
        # cpu workers run copies of the agent: its parameters travel through the segment
        # before every batch (agent_state.Params has the rule).
        self._mirror = Params(agent) if k.workers and not k.served else None
        if self._mirror is not None:
            _warn_unmirrored(agent, self._mirror)
            if self._mirror.empty:
                self._mirror = None
            else:
                specs["params"] = spec_of(tree_map(to_numpy, self._mirror.arrays()))
        if o.step_timeout is not None:  # each worker's progress marks: a cache line each
            specs["beats"] = Spec((self.n_workers, BEAT_WORDS), "<i8")
        nbytes, placed = layout(specs)
        self._nbytes = nbytes
        what = _contents(specs, T, B, E)
        if k.workers:
            self._res.shared = SharedBuffer(nbytes, what=what)
            arrays = views(self._res.shared.buf, placed)
        else:
            try:
                memory = bytearray(nbytes)
            except MemoryError as e:
                raise MemoryError(no_memory_message("buffer", nbytes, what)) from e
            arrays = views(memory, placed)
        self._bufs = arrays["main"]
        self._bufs["env_ids"] = np.arange(B)
        self._ebufs = arrays.get("eval")
        if E:
            self._ebufs["env_ids"] = np.arange(B, B + E)
        self._ctrl = arrays["ctrl"]
        self._params = arrays["params"] if self._mirror is not None else None
        self._beats = arrays.get("beats")
        self._watch: dict = {}  # worker -> (its progress marks, when the parent first saw them)
        self._poll_s = GATHER_POLL_S if self._beats is None else DEADLINE_POLL_S
        self._batch = self._make_batch()
        wait = o.reset_mode == "wait"
        if not k.workers:
            envs = self._res.envs
            for b in range(B):
                envs.append(make_env(env_fn, f"env {b}"))
            self._coll = Collector(list(envs), 0, self._bufs, batch_T=T, wait=wait,
                                   traj_info=self._new_traj(), where="serial sampler")
            self._runner.call("reset")
            self._coll.reset_all(o.seed, o.max_decorrelation_steps)
            self._ecoll = None
            return
        if k.served:
            self._runner.call("reset")
        W = self.n_workers
        self._slices = split(B, W)
        self._eslices = split(E, W)
        g = W // k.groups
        self._groups = [(list(range(i * g, (i + 1) * g)), self._slices[i * g][0],
                         self._slices[(i + 1) * g - 1][1]) for i in range(k.groups)]
        self._start_workers(env_fn, agent, nbytes, placed, wait)

    def _new_traj(self) -> Callable[[], TrajInfo]:
        """The TrajInfo factory a collector calls once per episode."""
        return functools.partial(self._o.traj_info, discount=self._o.discount)

    def _start_workers(self, env_fn, agent, nbytes, placed, wait) -> None:
        import multiprocessing as mp
        o, res = self._o, self._res
        ctx = mp.get_context(o.start_method)
        method = ctx.get_start_method()
        # Workers whose first message ("started") arrived: one that dies before it failed
        # while its process was starting (see _raise_worker_error).
        self._started: set = set()
        self._start_method = method
        common = dict(env_fn=env_fn, eval_env_fn=o.eval_env_fn or env_fn,
                      agent=None if self._k.served else agent, batch_T=o.batch_T,
                      batch_B=o.batch_B, eval_n=o.eval_n_envs, wait=wait, seed=o.seed,
                      max_decorrelation_steps=o.max_decorrelation_steps,
                      traj_info=self._new_traj(),
                      torch_threads=o.torch_threads)
        for w in range(self.n_workers):
            cfg = dict(common, slice=self._slices[w], eval_slice=self._eslices[w],
                       cpu_affinity=o.cpu_affinity[w % len(o.cpu_affinity)]
                       if o.cpu_affinity else None)
            payload = cfg if method == "fork" else _dumps(cfg)
            parent_conn, child_conn = ctx.Pipe()
            obs_ready, act_ready = ctx.Semaphore(0), ctx.Semaphore(0)
            res.sems.append((obs_ready, act_ready))  # named (spawn, forkserver): see drop_names
            stack_in = stack_out = None
            if self._beats is not None:
                stack_in, stack_out = ctx.Pipe(duplex=False)
                res.stack_pipes.append(stack_in)
            p = ctx.Process(target=worker_main, name=f"sampling-{self.kind}-worker-{w}",
                            args=(w, payload, res.shared.name, nbytes, placed, child_conn,
                                  obs_ready, act_ready, stack_out), daemon=True)
            with _without_mpi_env(), _sigint_blocked():
                p.start()
            child_conn.close()
            if stack_out is not None:
                stack_out.close()
            res.procs.append(p)
            res.conns.append(parent_conn)
        self._gather(range(self.n_workers), "ready")
        # Every worker has mapped the segment and opened its semaphores: drop their names,
        # so that nothing can leak them whatever happens next (even a SIGKILL of everyone).
        res.drop_names()
        log.debug("%s sampler: %d workers started (%s)", self.kind, self.n_workers, method)

    # -- batches -------------------------------------------------------------------------
    def steps(self, n: int | None = None) -> Iterator[Batch]:
        """Yield batches (``n`` of them, or forever); each is valid until the next."""
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"steps(n): n must be a non-negative int or None, got {n!r}")
        count = 0
        while n is None or count < n:
            yield self.obtain_samples(self._itr)
            count += 1

    def obtain_samples(self, itr: int = 0) -> Batch:
        """Collect and return one batch (rlpyt's name); ``itr`` reaches the agent's
        ``sample_mode``."""
        with self._collecting("obtain_samples"):
            batch = self._obtain(itr)
        self._itr = itr + 1
        return batch

    @contextmanager
    def _collecting(self, what: str) -> Iterator[None]:
        """One batch or evaluation at a time; any failure inside closes the sampler."""
        self._check_open()
        if not self._busy.acquire(blocking=False):
            raise SamplerError(
                f"{what}: the {self.kind} sampler is already collecting in another thread; a "
                f"sampler serves one thread at a time (make one sampler per thread, or hold a "
                f"lock around its calls)")
        try:
            yield
        except BaseException as e:
            self._close(graceful=False, reason=f"{type(e).__name__} during {what}")
            if self._interrupted and not isinstance(e, (SamplerError, KeyboardInterrupt)):
                # shutdown() from another thread pulled the pipes and processes away.
                raise SamplerClosedError(f"{what}: the {self.kind} sampler was shut down from "
                                         f"another thread while collecting") from e
            raise
        finally:
            self._busy.release()

    def _obtain(self, itr: int) -> Batch:
        k, bufs, runner = self._k, self._bufs, self._runner
        if not k.workers:
            runner.call("sample_mode", itr)
            done = run_batch(self._coll, runner, None, bufs)
        elif not k.served:
            runner.call("sample_mode", itr)
            if self._params is not None:
                _copy_params(self._params, self._mirror.arrays())
            self._send_all(("batch", itr))
            done = self._merge(self._gather(range(self.n_workers), "done"))
        else:
            runner.call("sample_mode", itr)
            self._send_all(("batch", itr))
            self._serve(itr)
            done = self._merge(self._gather(range(self.n_workers), "done"))
        if "bootstrap_value" in bufs and (k.served or not k.workers):
            T = self.batch_T
            v = runner.value(_row(bufs["observation_full"], T), bufs["prev_action_full"][T],
                             bufs["prev_reward_full"][T], bufs["env_ids"])
            write_checked(bufs["bootstrap_value"], v, "bootstrap value", "agent.value returned")
        batch = Batch(self._batch)
        batch["traj_infos"] = [traj for _, _, traj in done]
        return batch

    def _serve(self, itr: int) -> None:
        """The action server: per step, per group, wait for observations, act, release."""
        bufs, runner, wait = self._bufs, self._runner, self._o.reset_mode == "wait"
        groups, overlap = self._groups, self._k.overlap
        pending = None
        for t in range(self.batch_T):
            for workers, lo, hi in groups:
                self._wait_obs(workers)
                if pending is not None:
                    self._release(pending)
                    pending = None
                runner.act(bufs, t, lo, hi, wait, "action server")
                if overlap:
                    self._release(workers)
                else:
                    pending = workers
        if pending is not None:
            self._release(pending)

    # -- evaluation ----------------------------------------------------------------------
    def evaluate_agent(self, itr: int = 0) -> list:
        """Run the agent in eval mode on the eval envs; return finished episodes' TrajInfos.

        Stops after ``eval_max_steps`` env steps in all (``// eval_n_envs`` per env) or
        once ``eval_max_trajectories`` episodes finished, whichever comes first.
        """
        self._check_open()
        if not self._o.eval_n_envs:
            raise ValueError("evaluate_agent needs eval envs: pass eval_n_envs > 0 (and "
                             "eval_env_fn, which defaults to env_fn) to make_sampler")
        with self._collecting("evaluate_agent"):
            return self._evaluate(itr)

    def _evaluate(self, itr: int) -> list:
        o, k, runner, ebufs, ctrl = self._o, self._k, self._runner, self._ebufs, self._ctrl
        E = o.eval_n_envs
        max_T = o.eval_max_steps // E if o.eval_max_steps is not None else 2**62
        max_traj = o.eval_max_trajectories if o.eval_max_trajectories is not None else 2**62
        first = self._eval_count == 0
        self._eval_count += 1
        runner.call("eval_mode", itr)
        if not k.workers:
            if self._ecoll is None:
                env_fn = o.eval_env_fn
                for e in range(E):
                    self._res.envs.append(make_env(env_fn, f"eval env {e}", "eval_env_fn"))
                self._ecoll = Collector(self._res.envs[self.batch_B:], 0, ebufs, batch_T=1,
                                        wait=False, traj_info=self._new_traj(),
                                        where="serial sampler", label="eval env")
            restart_eval(self._ecoll, runner, o.seed + self.batch_B, first)
            results = run_eval(self._ecoll, runner, None, ebufs, max_T, max_traj, ctrl)
        else:
            # Lockstep: workers report every step; the parent counts finished episodes over
            # all eval envs and says when to stop, so every kind stops at the same step.
            if self._params is not None:
                _copy_params(self._params, self._mirror.arrays())
            ctrl[0] = 0
            self._send_all(("eval", itr, max_T))
            everyone = list(range(self.n_workers))
            if k.served:
                runner.reset_started(np.ones(E, bool), ebufs["env_ids"])
            finished = 0
            for step in range(max_T + 1):
                self._wait_obs(everyone)
                if step:
                    finished += int(ebufs["done"][0].sum())
                if step == max_T or finished >= max_traj:
                    ctrl[0] = 1
                    self._release(everyone)
                    break
                if k.served:
                    runner.act(ebufs, 0, 0, E, False, "action server (eval)")
                self._release(everyone)
            results = self._merge(self._gather(everyone, "done"))
        results.sort(key=lambda r: (r[0], r[1]))
        return [traj for _, _, traj in results[:max_traj]]

    # -- parent side of the protocol -----------------------------------------------------
    def _send_all(self, msg: tuple) -> None:
        # A Ctrl-C in the middle of a send would leave half a message in the pipe (and
        # a pickling buffer that CPython 3.13 complains about): let it land after the sends.
        with _sigint_blocked():
            failed = None
            for w, c in enumerate(self._res.conns):
                try:
                    c.send(msg)
                except (BrokenPipeError, ConnectionResetError, EOFError):
                    failed = w
                    break
        if failed is not None:
            self._raise_worker_error(failed)

    def _gather(self, workers, expect: str) -> dict:
        """Wait for one ``expect`` message from each of ``workers``; fail fast on any error."""
        res = self._res
        pending = {res.conns[w]: w for w in workers}
        out = {}
        while pending:
            self._check_open()  # shut down from another thread: stop waiting
            sentinels = {res.procs[w].sentinel: w for w in pending.values()}
            ready = mp_connection.wait(list(pending) + list(sentinels), timeout=self._poll_s)
            if not ready:
                self._check_deadlines()
            for obj in ready:
                if obj in pending:
                    w = pending[obj]
                    try:
                        msg = obj.recv()
                        # A worker's first message says its process started; what it was
                        # asked for may be right behind it.
                        while msg[0] == "started":
                            self._started.add(w)
                            if not obj.poll():
                                break
                            msg = obj.recv()
                    except Exception as e:  # a closed pipe, or a message that won't unpickle
                        self._raise_worker_error(w, _unreadable(e))
                    if msg[0] == "started":
                        continue  # still pending
                    del pending[obj]
                    if msg[0] != expect:
                        self._raise_worker_error(w, msg)
                    out[w] = msg[1] if len(msg) > 1 else None
            for obj in ready:
                w = sentinels.get(obj)
                if w is not None and res.conns[w] in pending:
                    self._raise_worker_error(w)
        return out

    def _wait_obs(self, workers) -> None:
        sems, check = self._res.sems, self._check_workers
        for w in workers:
            acquire(sems[w][0], check, PARENT_SPIN_S)

    def _release(self, workers) -> None:
        sems = self._res.sems
        for w in workers:
            sems[w][1].release()

    def _check_workers(self) -> None:
        self._check_open()  # shut down from another thread: stop waiting
        self._check_deadlines()
        for w, (p, c) in enumerate(zip(self._res.procs, self._res.conns)):
            if c.poll() or p.exitcode is not None:
                self._raise_worker_error(w)

    # -- the step deadline ---------------------------------------------------------------
    def _check_deadlines(self) -> None:
        """Raise for a worker whose progress marks have not moved for longer than its
        phase's deadline (a worker waiting for the parent has none)."""
        beats = self._beats
        if beats is None:
            return
        now = time.monotonic()
        for w in range(len(self._res.procs)):
            seq, phase, t, j = beats[w, :4].tolist()
            if phase == IDLE:
                self._watch.pop(w, None)
                continue
            seen = self._watch.get(w)
            if seen is None or seen[0] != (seq, j):
                self._watch[w] = ((seq, j), now)
                continue
            limit = self._o.step_timeout * (ENV_FN_TIMEOUT_FACTOR if phase in (MAKE, EVAL_MAKE)
                                            else 1)
            if now - seen[1] > limit:
                self._raise_stuck(w, phase, t, j, limit)

    def _raise_stuck(self, w: int, phase: int, t: int, j: int, limit: float):
        proc = self._res.procs[w]
        stack = _stack_of(proc, self._res.stack_pipes[w])
        _quietly(proc.kill)
        lo, hi = self._slices[w]
        elo = self._eslices[w][0]
        env, eval_env = (f"env {lo + j}" if j >= 0 else f"envs {lo}..{hi - 1}",
                         f"eval env {elo + j}")
        late = "did not return"
        what = {MAKE: f"env_fn() for {env} {late}",
                EVAL_MAKE: f"eval_env_fn() for {eval_env} {late}",
                RESET: f"the first reset of {env} {late}",
                DECORRELATE: f"{env} {late} from decorrelation step {t}",
                AGENT: f"its copy of the agent {late} at batch step {t}",
                STEP: f"{env} {late} from its step at batch step {t} (or the reset after an "
                      f"episode's end)",
                EVAL: f"{eval_env} {late} from its step at evaluation step {t}",
                BATCH_RESET: f"the reset of {env} before a batch {late}",
                EVAL_RESET: f"the reset of {eval_env} before an evaluation {late}"}[phase]
        within = (f"{limit:g} s ({ENV_FN_TIMEOUT_FACTOR} x step_timeout)"
                  if phase in (MAKE, EVAL_MAKE) else f"step_timeout={self._o.step_timeout:g} s")
        head = f"{self.kind} sampler: worker {w} (envs {lo}..{hi - 1})"
        where = (f"Its Python stack when the parent gave up (every thread, most recent call "
                 f"first):\n{stack}" if stack else
                 f"It did not respond to {_signame(STACK_SIGNAL)} within {STACK_WAIT_S:g} s, so "
                 f"there is no stack: the process is stopped (SIGSTOP, a debugger) or blocked "
                 f"in the kernel")
        err = WorkerError(f"{head}: {what} within {within}; the worker was killed. {where}",
                          w, list(range(lo, hi)), None, stack)
        self._close(graceful=False, reason=f"worker {w} missed its step deadline")
        raise err

    def _raise_worker_error(self, w: int, msg: tuple | None = None):
        # Workers stopped by shutdown() from another thread are not failures.
        self._check_open()
        conn, proc = self._res.conns[w], self._res.procs[w]
        if msg is None:
            try:
                if conn.poll(REPORT_WAIT_S):  # an error report may be just behind the exit
                    msg = conn.recv()
                    while msg[0] == "started" and conn.poll(REPORT_WAIT_S):
                        self._started.add(w)
                        msg = conn.recv()
            except (EOFError, OSError):
                msg = None
            except Exception as e:
                msg = _unreadable(e)
        if msg is not None and msg[0] == "started":
            self._started.add(w)
            msg = None
        lo, hi = self._slices[w]
        envs = list(range(lo, hi))
        head = f"{self.kind} sampler: worker {w} (envs {lo}..{hi - 1})"
        cause = None
        if msg is not None and msg[0] == "error":
            _, cause, tb = msg
            where = getattr(cause, "sampling_where", None)
            cause.__cause__ = RemoteTraceback(tb)
            err = WorkerError(
                f"{head} raised {type(cause).__name__}: {cause}"
                + (f" (in {where})" if where else "")
                + "; its traceback is shown above and in .remote_traceback",
                w, envs, None, tb)
        else:
            proc.join(0.5)
            code = proc.exitcode
            if code is None:
                how = "stopped answering (its pipe closed)"
            elif code < 0:
                how = f"was killed by signal {_signame(-code)}"
            else:
                how = f"exited with code {code}"
            if code is not None and code < 0 and -code == getattr(signal, "SIGBUS", None):
                shared = self._res.shared
                text = _sigbus_text(head, how, self._nbytes,
                                    shared is not None and shared.reserved)
            elif code is not None and w not in self._started:
                text = _startup_failure(head, how, code, self._start_method)
            else:
                text = (f"{head} {how} without reporting an error; if nothing killed it, "
                        f"check the system log for the out-of-memory killer or look for "
                        f"os._exit/sys.exit in the env")
            err = WorkerError(text, w, envs, code, None)
        self._close(graceful=False, reason=str(err))
        raise err from cause

    # -- shutdown ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed_reason is not None:
            raise SamplerClosedError(f"the {self.kind} sampler is closed ({self._closed_reason}); "
                                     f"make a new one with make_sampler")

    def _close(self, graceful: bool, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        try:
            self._res.close(graceful)  # complete even when a Ctrl-C interrupts it
        finally:
            self._finalizer.detach()

    def shutdown(self) -> None:
        """Stop workers and release shared memory; idempotent. Called from another thread
        while a batch is being collected, it stops the workers at once, and the collecting
        thread raises :class:`SamplerClosedError`."""
        if self._busy.acquire(blocking=False):
            try:
                self._close(graceful=True, reason="shut down")
            finally:
                self._busy.release()
        else:
            self._interrupted = True
            self._close(graceful=False, reason="shut down while collecting")

    close = shutdown

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc) -> None:
        self._close(graceful=exc[0] is None, reason="shut down")

    def __repr__(self) -> str:
        state = "closed" if self._closed_reason else "open"
        return (f"<Sampler kind={self.kind!r} batch_T={self.batch_T} batch_B={self.batch_B} "
                f"n_workers={self.n_workers} {state}>")

    def _make_batch(self) -> Batch:
        b, T = self._bufs, self.batch_T
        obs = tree_map(lambda a: a[:T], b["observation_full"])
        batch = Batch(observation=obs, prev_action=b["prev_action_full"][:T],
                      prev_reward=b["prev_reward_full"][:T], action=b["action"],
                      agent_info=b["agent_info"], reward=b["reward"],
                      terminated=b["terminated"], truncated=b["truncated"], done=b["done"],
                      env_info=b["env_info"])
        for k in ("final_observation", "bootstrap_value"):
            if k in b:
                batch[k] = b[k]
        return batch

    @staticmethod
    def _merge(msgs: dict) -> list:
        out = []
        for w in sorted(msgs):
            out.extend(msgs[w])
        out.sort(key=lambda r: (r[0], r[1]))
        return out


# -- helpers ---------------------------------------------------------------------------
@dataclass
class _Probed:
    """What the probe env and one agent call tell about the batch layout."""

    observation: Any       # one env's observation (a tree of arrays)
    action_shape: tuple
    action_dtype: str
    env_info: dict         # the numeric entries of one step's info
    agent_info: dict       # one env's agent_info
    observation_space: Any
    action_space: Any


def _probe(env_fn: Callable, runner: AgentRunner, seed: int) -> _Probed:
    """Build one separate env to learn the layout: observation, action, infos.

    Training envs are never stepped before their seeded reset; this env is thrown away.
    Everything runs under :class:`RngGuard`: the user's random streams (global, and the
    agent's own generators) come out as they went in.
    """
    with RngGuard(runner.agent):
        return _probe_unguarded(env_fn, runner, seed)


def _probe_unguarded(env_fn: Callable, runner: AgentRunner, seed: int) -> _Probed:
    what = "the probe env (the parent builds one to size buffers)"
    env = make_env(env_fn, what)
    try:
        obs = check_reset(env.reset(seed=seed), what)
        space = env.action_space
        shape, dtype = getattr(space, "shape", None), getattr(space, "dtype", None)
        if shape is None or dtype is None:
            raise TypeError(f"the env's action_space {space!r} has no shape/dtype; "
                            f"dict or tuple action spaces are not supported")
        a = random_action_fn(space, np.random.default_rng(seed))(1)
        info = check_step(env.step(env_action(a[0])), what)[4]
        obs_space = getattr(env, "observation_space", None)
    finally:
        try:
            env.close()
        except Exception:
            pass
    obs = tree_map(np.asarray, obs)
    for path, leaf in tree_leaves(obs):
        if leaf.dtype.kind not in "biufc":
            raise TypeError(
                f"{what}: observation{path_text(path)} is {leaf.dtype} ({leaf!r:.80}); a batch "
                f"stores numbers: observations must be numeric arrays (dicts and tuples of "
                f"them are fine). Variable-size spaces (Graph, Sequence, Text) cannot be "
                f"batched: wrap the env to return fixed-size arrays")
    env_info = _numeric(info, what)
    obs1 = tree_map(lambda x: x[None], obs)
    act_shape, act_dtype = tuple(shape), np.dtype(dtype).str
    action, agent_info = runner.step(obs1, np.zeros((1,) + act_shape, act_dtype),
                                     np.zeros(1, np.float32), np.arange(1))
    action = to_numpy(action)
    if action.shape != (1,) + act_shape:
        raise ValueError(f"the agent returned actions of shape {action.shape} for 1 env; "
                         f"expected {(1,) + act_shape} (one row per env, shaped like the action "
                         f"space {space!r})")
    agent_info = tree_map(lambda x: to_numpy(x)[0], agent_info) if agent_info else {}
    return _Probed(obs, act_shape, act_dtype, env_info, agent_info, obs_space, space)


def _contents(specs: dict, T: int, B: int, E: int) -> str:
    """What a sampler's memory holds, part by part, for allocation errors."""
    names = {"main": f"the batch [batch_T={T}, batch_B={B}]",
             "eval": f"the eval buffers [eval_n_envs={E}]",
             "params": "the agent's parameters (copied to the cpu workers)"}
    parts = [f"{text}: {size_text(layout({key: specs[key]})[0])}"
             for key, text in names.items() if key in specs]
    return ", ".join(parts)


def _warn_unmirrored(agent: Any, mirror: Params) -> None:
    """Say once, at construction, if a cpu worker's copy would keep arrays frozen."""
    if mirror.explicit:
        return  # the agent says what to mirror: its shared_arrays() is the rule
    frozen = unmirrored_arrays(agent)
    if frozen:
        warnings.warn(
            f"the cpu kind runs a copy of the agent in every worker, and this agent holds "
            f"float arrays outside any torch module ({', '.join(frozen[:5])}"
            f"{', ...' if len(frozen) > 5 else ''}): the workers' copies would keep them at "
            f"their initial values, whatever the training loop does to them here. Give the "
            f"agent a shared_arrays() method returning them (a dict of arrays updated in "
            f"place; it is copied into every worker before each batch), or use the 'gpu' or "
            f"'serial' kind, where this process runs the agent itself", stacklevel=4)


def _unreadable(e: Exception) -> tuple | None:
    """An error message standing in for a worker message the parent could not read."""
    if isinstance(e, (EOFError, OSError)):
        return None  # the pipe closed: the worker died; its exit code tells the rest
    return ("error", SamplerError(f"its message could not be unpickled in the parent "
                                  f"({type(e).__name__}: {e})"), "(no traceback: the message "
            "itself was unreadable)")


INT64 = np.iinfo(np.int64)


def _numeric(info: Any, what: str, path: tuple = ()) -> dict:
    """The numeric entries of an info dict, as arrays (the env_info layout)."""
    if not isinstance(info, dict):
        raise TypeError(f"{what}: env.step returned info{path_text(path)} of type "
                        f"{type(info).__name__}; the gymnasium API's info is a dict "
                        f"(return {{}} if there is nothing to report)")
    out = {}
    for k, v in info.items():
        if isinstance(v, dict):
            sub = _numeric(v, what, path + (k,))
            if sub:
                out[k] = sub
            continue
        if isinstance(v, int) and not INT64.min <= v <= INT64.max:
            raise OverflowError(f"{what}: env.step returned info{path_text(path + (k,))}={v}, "
                                f"beyond int64: a batch cannot store it. Report it as a "
                                f"float, or leave it out of info")
        try:
            a = np.asarray(v)
        except Exception:
            continue
        if a.dtype.kind in "biuf":
            out[k] = a
    return out


def _copy_params(dst: dict, src: Any) -> None:
    for path, arr in tree_leaves(dst):
        np.copyto(arr, to_numpy(get(src, path)))


def _batch_specs(T: int, B: int, p: _Probed, final_obs: bool, bootstrap: bool) -> dict:
    def arr(rows, shape, dtype):
        return Spec((rows, B) + tuple(shape), dtype, True)  # env-major: see buffers.layout

    s = {
        "observation_full": spec_of(p.observation, (T + 1, B), env_major=True),
        "prev_action_full": arr(T + 1, p.action_shape, p.action_dtype),
        "prev_reward_full": arr(T + 1, (), "<f4"),
        "action": arr(T, p.action_shape, p.action_dtype),
        "agent_info": spec_of(p.agent_info, (T, B), env_major=True),
        "reward": arr(T, (), "<f4"),
        "terminated": arr(T, (), "|b1"),
        "truncated": arr(T, (), "|b1"),
        "done": arr(T, (), "|b1"),
        "env_info": spec_of(p.env_info, (T, B), env_major=True),
    }
    if final_obs:
        s["final_observation"] = spec_of(p.observation, (T, B), env_major=True)
    if bootstrap:
        s["bootstrap_value"] = Spec((B,), "<f4")
    return s


def _row(tree, t):
    return tree_map(lambda a: a[t], tree) if is_tree(tree) else tree[t]


def _dumps(obj: Any) -> bytes:
    import cloudpickle
    return cloudpickle.dumps(obj)


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


@contextmanager
def _sigint_blocked():
    # Holds SIGINT back (it is delivered when the block ends). Around p.start() it also
    # protects the child, which inherits the mask (across exec too) and keeps SIGINT blocked
    # until worker_main ignores it: a Ctrl-C while a spawn worker still imports the main
    # module cannot kill it.
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def _without_mpi_env():
    # An MPI launcher's variables make a child believe it is an MPI rank (and hang in init).
    saved = {k: os.environ.pop(k) for k in list(os.environ)
             if k.startswith(("OMPI_", "PMI_", "PMIX_"))}
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
    """The message for a worker that died before worker_main's first statement ran."""
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
    try:
        while True:
            wait = deadline - time.monotonic() if not data else STACK_QUIET_S
            if wait <= 0 or not pipe.poll(wait):
                break
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.decode(errors="replace").strip() or None

