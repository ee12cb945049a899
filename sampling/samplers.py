"""One sampler class for every kind: batch semantics, and the driver each kind names.

Imports kinds, probe, pool, worker, collector, vector, agents, agent_state, buffers, errors
and tree. The sampler owns what it must release in a :class:`~sampling.pool.Resources` (the
worker pool, the shared segment, the in-process envs), whose ``close`` runs on shutdown, on
every error path, from a finalizer and at exit. Drivers (see :data:`sampling.kinds.DRIVERS`):

* ``in_process``: the :class:`~sampling.worker.Program` a worker runs, run here;
* ``worker_agents``: each worker collects its slice with its own copy of the agent; the
  parameters are copied into the segment first;
* ``served``: workers step their slices; per step and per group of workers this process
  waits for their observations, computes the actions and releases them (overlapping the
  next group's wait if the kind says so).

Each batch is started (``_launch``: the parameters' snapshot, the command), which gives a
:class:`_Flight`, and waited for (``_land``). Without policy_lag one follows the other;
with it, the next batch is launched before the caller gets this one, into the other set of
batch buffers, and a served kind's action server runs in a thread with a copy of the agent
meanwhile.

With ``max_restarts``, the pool absorbs worker failures; after the batch (or evaluation)
:meth:`Sampler._recover` pads the failed workers' columns (:func:`_pad`) and replaces them.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .agent_state import (
    Params,
    check_same_params,
    independent_copy,
    load_params,
    unmirrored_arrays,
)
from .agents import AgentRunner
from .buffers import SharedBuffer, Spec, layout, no_memory_message, spec_of, views
from .collector import (
    AGENT,
    HANDED,
    STEP,
    WAIT,
    Numbering,
    TrajInfo,
    make_env,
)
from .errors import (
    SamplerClosedError,
    SamplerError,
    WorkerError,
    close_all,
    locate,
    warn,
)
from .kinds import KINDS, split, worker_count
from .pool import BEAT_WORDS, POLL_S, Failure, Pool, PoolSpec, Resources
from .probe import Probed, batch_specs, contents, probe
from .tree import to_numpy, tree_leaves, tree_map
from .vector import Form, env_form
from .worker import (
    Collect,
    Evaluate,
    LocalLink,
    Program,
    WorkerConfig,
    bootstrap,
    buffer_sets,
    deadline,
    run,
    stuck_text,
)

__all__ = ["Batch", "Episodes", "Options", "Restart", "Sampler"]

# "No limit" for an evaluation's steps and episodes: more than any run takes, within int64.
UNLIMITED = 2**62
# Waiting for the action server's thread (policy_lag) in slices this long, so that a
# Ctrl-C in the waiting thread is handled within one.
THREAD_JOIN_SLICE_S = 0.1
# How long closing waits for that thread to notice: it checks whether the sampler is
# closed between its waits, which last up to pool.POLL_S.
THREAD_STOP_S = 2 * POLL_S


class Batch(dict):
    """A batch: a dict of ``[T, B, ...]`` arrays (nested dicts for dict spaces) whose keys
    are also attributes. Arrays are views of the sampler's buffers, valid until the
    next batch; ``traj_infos`` lists the episodes that finished during this batch."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Restart:
    """A worker that failed and was replaced (``max_restarts``): where, why, and what its
    columns of the batch hold. See docs/failures.md for the rule."""

    worker: int
    envs: list          # the global indices of its training envs (all rebuilt)
    during: str         # "batch", "evaluation" or "start" (a worker starting, or restarting)
    step: int | None    # during a batch: the row from which its columns are padding
    error: WorkerError  # what it would have raised: message, __cause__, .remote_traceback
    restart: int        # how many times this worker has now been restarted

    def __str__(self) -> str:
        at = f" at step {self.step} of the batch" if self.step is not None else ""
        return (f"worker {self.worker} (envs {self.envs[0]}..{self.envs[-1]}) restarted "
                f"(restart {self.restart}) after a failure during {self.during}{at}: "
                f"{self.error}")


class Episodes(list):
    """The TrajInfos of finished episodes (``batch.traj_infos``, ``evaluate_agent()``), in
    the order they ended: by step, then by env. ``ends`` holds each one's (step, global env
    index); :mod:`sampling.distributed` merges the lists of all ranks in that order."""

    def __init__(self, results: Any = ()):
        results = list(results)  # (step, global env index, TrajInfo) triples
        super().__init__(traj for _, _, traj in results)
        self.ends = [(t, b) for t, b, _ in results]


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
    policy_lag: int = 0
    rank: int = 0
    world_size: int = 1
    max_restarts: int = 0



@dataclass
class _Flight:
    """A batch started into buffer set ``s`` (see :meth:`Sampler._launch`): ``land()``
    waits for it and returns its finished episodes (raising its failure); ``busy``: workers
    or a thread collect it right now, so closing must stop them at once, after
    ``abort()``."""

    s: int
    land: Callable[[], list]
    busy: bool = False
    abort: Callable[[], Any] = lambda: None


class Sampler:
    """Collects ``[batch_T, batch_B]`` batches from ``batch_B`` envs in the way of one kind.

    Made by :func:`sampling.make_sampler`; use it as a context manager (or call
    :meth:`shutdown`). Attributes: ``kind``, ``batch_T``, ``batch_B``, ``n_workers``,
    ``observation_space``, ``action_space``, ``rank``, ``world_size`` and ``env_ids``
    (the global indices of its envs: ``rank * batch_B`` on).
    """

    def __init__(self, kind: str, env_fn: Callable, agent: Any, opts: Options,
                 probed: Probed | None = None):
        self.kind = kind
        self._kind = KINDS[kind]
        self.batch_T, self.batch_B = opts.batch_T, opts.batch_B
        self.rank, self.world_size = opts.rank, opts.world_size
        self._num = Numbering(opts.rank, opts.world_size, opts.batch_B, opts.eval_n_envs)
        self.env_ids = self._num.env_ids()
        self._of_rank = f" of rank {opts.rank}" if opts.world_size > 1 else ""
        self._where = f"{kind} sampler{self._of_rank}"
        self.n_workers = 0  # set once the probe tells how many envs env_fn's envs step
        self._opts = opts
        self._itr = 0
        self.restarts: list = []     # every Restart so far (max_restarts)
        self._unreported: list = []  # those not yet in a batch's restarts
        self._closed_reason: str | None = None
        self._busy = threading.Lock()  # held while a batch or an evaluation runs
        self._interrupted = False      # shutdown() came while another thread collected
        self._flight: _Flight | None = None  # the batch being collected (see _launch)
        self._res = Resources()
        self._finalizer = self._res.track(self)
        self._runner = AgentRunner(agent)
        try:
            self._setup(env_fn, agent, probed)
        except BaseException as e:
            locate(e)
            self._close(graceful=False, reason="its construction failed")
            raise

    # -- construction --------------------------------------------------------------------
    def _setup(self, env_fn: Callable, agent: Any, probed: Probed | None) -> None:
        o, kind = self._opts, self._kind
        T, B, n_eval = o.batch_T, o.batch_B, o.eval_n_envs
        p = probed or probe(env_fn, self._runner, o.seed, self._num.first, o.bootstrap_value)
        self.observation_space, self.action_space = p.observation_space, p.action_space
        self._form = self._eform = p.form
        spare_eval = None
        if n_eval and o.eval_env_fn is not env_fn:
            # One eval env, built here to learn its num_envs: serial keeps it as its first.
            spare_eval = make_env(o.eval_env_fn, "the first eval env", "eval_env_fn")
            self._res.envs.append(spare_eval)  # closed on every path
            self._eform = env_form(spare_eval, "the first eval env")
            if kind.workers:
                close_all(self._res.envs)
                spare_eval = None
        _check_vector(o, self._form, self._eform)
        self.n_workers = worker_count(self.kind, B, o.n_workers, width=p.form.width)
        specs = {"main": batch_specs(T, B, p, o.final_observation, o.bootstrap_value),
                 "ctrl": Spec((1,), "<i8")}  # ctrl[0]: the parent's "stop evaluating" flag
        if o.policy_lag:  # a second set of batch buffers: one is collected, one is held
            specs["main1"] = specs["main"]
        if n_eval:
            specs["eval"] = batch_specs(1, n_eval, p, False, False)
        # Workers with their own copy of the agent: its parameters travel through the
        # segment before every batch (agent_state.Params has the rule).
        self._mirror = Params(agent) if kind.driver == "worker_agents" else None
        if self._mirror is not None:
            _warn_unmirrored(agent, self._mirror)
            if not self._mirror.empty:  # (nothing to copy: no params, see _launch)
                specs["params"] = spec_of(tree_map(to_numpy, self._mirror.arrays()))
        if o.step_timeout is not None or o.max_restarts:
            # Each worker's beat (a cache line each): where it is, for the step deadline
            # and for the row a failure cuts the batch at.
            specs["beats"] = Spec((self.n_workers, BEAT_WORDS), "<i8")
        nbytes, placed = layout(specs)
        arrays = self._allocate(nbytes, placed, contents(specs, T, B, n_eval))
        # Batch buffer sets: one, or two with policy_lag (batch k in set k % 2).
        self._sets = buffer_sets(arrays, self._num)
        self._next_set = 0  # the buffer set the next batch goes into (policy_lag)
        self._ebufs = arrays.get("eval")
        self._ctrl = arrays["ctrl"]
        self._params = arrays.get("params")
        self._batches = [self._make_batch(bufs) for bufs in self._sets]
        # Who computes actions and values while batches are collected in this process:
        # the agent itself, or, where the caller trains meanwhile (policy_lag with an
        # action server), a copy whose parameters are set at each snapshot.
        self._collecting_runner = self._runner
        self._snapshot = None
        if o.policy_lag and kind.served:
            copy = independent_copy(agent)
            self._collecting_runner = AgentRunner(copy)
            self._snapshot = (Params(agent), Params(copy))
            check_same_params(self._snapshot[1].arrays(), self._snapshot[0].arrays(),
                              "the action server's copy of the agent (policy_lag=1)")
            _warn_unmirrored(agent, self._snapshot[0], server=True)
        self._slices = _slices(B, max(self.n_workers, 1), p.form.width)
        self._eslices = _slices(n_eval, max(self.n_workers, 1), self._eform.width)
        if not kind.workers:
            self._program = Program(LocalLink(self._res.pool.closed, self._res.envs), arrays,
                                    self._config(0, env_fn, agent), self._runner, spare_eval)
            return
        if kind.served:
            self._collecting_runner.call("reset")
        self._start_pool(env_fn, agent, placed, arrays.get("beats"))

    def _allocate(self, nbytes: int, placed: dict, what: str) -> dict:
        """The batch's arrays: in a shared segment for workers, else in this process."""
        if self._kind.workers:
            self._res.shared = SharedBuffer(nbytes, what=what,
                                            keep_fd=self._opts.max_restarts > 0)
            return views(self._res.shared.buf, placed)
        try:
            return views(bytearray(nbytes), placed)
        except MemoryError as e:
            raise MemoryError(no_memory_message("buffer", nbytes, what)) from e

    def _config(self, w: int, env_fn: Callable, agent: Any) -> WorkerConfig:
        """Program w's config (the serial sampler's is program 0, in this process)."""
        o = self._opts
        return WorkerConfig(
            index=w, env_fn=env_fn, eval_env_fn=o.eval_env_fn,
            agent=None if self._kind.served else agent, batch_T=o.batch_T, batch_B=o.batch_B,
            eval_n=o.eval_n_envs, wait=o.reset_mode == "wait", seed=o.seed, rank=o.rank,
            world_size=o.world_size, max_decorrelation_steps=o.max_decorrelation_steps,
            traj_info=functools.partial(o.traj_info, discount=o.discount),
            torch_threads=o.torch_threads, envs=self._slices[w], eval_envs=self._eslices[w],
            form=self._form, eval_form=self._eform, in_process=not self._kind.workers,
            cpu_affinity=o.cpu_affinity[w % len(o.cpu_affinity)] if o.cpu_affinity else None,
            where=f"worker {w}{self._of_rank}" if self._kind.workers else self._where)

    def _start_pool(self, env_fn: Callable, agent: Any, placed: dict, beats: Any) -> None:
        o, n = self._opts, self.n_workers
        configs = [self._config(w, env_fn, agent) for w in range(n)]
        # Replacements (max_restarts) start from the last collected batch's buffer set.
        carry = self._carry = {"set": 0}
        per = n // self._kind.groups
        self._groups = [list(range(g * per, (g + 1) * per)) for g in range(self._kind.groups)]
        self._group_envs = [(self._slices[ws[0]][0], self._slices[ws[-1]][1])
                            for ws in self._groups]
        # Messages name envs by their global indices (see collector.Numbering).
        f, ef = self._num.first, self._num.eval_first
        named = [(lo + f, hi + f) for lo, hi in self._slices]
        enamed = [(lo + ef, hi + ef) for lo, hi in self._eslices]
        labels = [f"{self._where}: worker {w} (envs {lo}..{hi - 1}"
                  + (f"; eval envs {elo}..{ehi - 1})" if ehi > elo else ")")
                  for w, ((lo, hi), (elo, ehi)) in enumerate(zip(named, enamed))]
        self._res.pool.start(PoolSpec(
            program=run, configs=configs, shared=self._res.shared, placed=placed,
            labels=labels, envs=[list(range(lo, hi)) for lo, hi in named],
            start_method=o.start_method, name=f"{__package__}-{self.kind}",
            beats=beats,
            deadline=functools.partial(deadline, o.step_timeout),
            stuck=functools.partial(stuck_text, o.step_timeout, named, enamed,
                                    self._form, self._eform),
            close_timeout=o.shutdown_timeout, max_restarts=o.max_restarts,
            renew=lambda w, k: dataclasses.replace(configs[w], restart=k, start_set=carry["set"])))
        # Every worker has mapped the segment: drop its name, so that nothing can leak it
        # whatever happens next (even a SIGKILL of everyone).
        self._res.shared.unlink()
        self._recover(None, "start")  # workers replaced while starting (max_restarts)

    # -- batches -------------------------------------------------------------------------
    def steps(self, n: int | None = None) -> Iterator[Batch]:
        """Yield batches (``n`` of them, or forever); each is valid until the next. With
        policy_lag, the n-th batch starts no further one."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral)):
            raise TypeError(f"steps(n): n must be a non-negative int or None, got {n!r} "
                            f"({type(n).__name__})")
        if n is not None and n < 0:
            raise ValueError(f"steps(n): n must be a non-negative int or None, got {n!r}")
        count = 0
        while n is None or count < n:
            count += 1
            yield self._obtain(self._itr, ahead=n is None or count < n)

    def obtain_samples(self, itr: int = 0) -> Batch:
        """Collect and return one batch (rlpyt's name); ``itr`` reaches the agent's
        ``sample_mode``. With ``policy_lag=1``: return the batch collected since the last
        call, and start the next one (``sample_mode(itr + 1)``) with the agent's parameters
        as they are now."""
        return self._obtain(itr, ahead=True)

    def _obtain(self, itr: int, ahead: bool) -> Batch:
        """:meth:`obtain_samples`; ``ahead``: with policy_lag, start the next batch."""
        with self._collecting("obtain_samples"):
            if self._flight is None:  # always without policy_lag; with it, the first batch
                self._launch(itr, self._next_set)  # (collected now, as is the next)
            s, done = self._land()
            if self._opts.policy_lag:
                self._next_set = 1 - s
                if ahead:  # the snapshot: the parameters as they are now
                    self._launch(itr + 1, 1 - s)
            batch = Batch(self._batches[s])
            batch["traj_infos"] = Episodes(done)
            if self._opts.max_restarts:
                batch["restarts"], self._unreported = self._unreported, []
        self._itr = itr + 1
        return batch

    def _launch(self, itr: int, s: int) -> None:
        """Start collecting a batch into buffer set ``s``, with the agent's parameters as
        they are now; :meth:`_land` waits for it. ``in_process`` collects it here and now;
        ``worker_agents`` sends the workers their command; ``served`` serves the workers
        in this thread at :meth:`_land`, or, while the caller trains (policy_lag), in a
        thread of its own with a copy of the agent."""
        driver, runner, pool = self._kind.driver, self._collecting_runner, self._res.pool
        if self._snapshot is not None:
            load_params(self._snapshot[1].arrays(), self._snapshot[0].arrays())
        runner.call("sample_mode", itr)
        if driver == "in_process":
            done = self._program.collect(itr, s)
            self._flight = _Flight(s, lambda: done)
        elif driver == "worker_agents":
            if self._params is not None:
                load_params(self._params, self._mirror.arrays())
            pool.send(Collect(itr, s))
            self._flight = _Flight(s, lambda: _merge(pool.gather(range(pool.size))), busy=True)
        else:
            serve = functools.partial(
                _serve_batch, pool, self._sets[s], runner, self._groups, self._group_envs,
                self._opts.reset_mode == "wait", self._kind.overlap, itr, s,
                functools.partial(bootstrap, num=self._num, where=self._where))
            if not self._opts.policy_lag:
                self._flight = _Flight(s, serve)
                return
            # The thread gets what it needs, not the sampler: a sampler dropped with a batch
            # in flight is collected (and closed) at once.
            box: dict = {"finished": threading.Event()}
            threading.Thread(target=_serve_in_thread, args=(serve, box), daemon=True,
                             name=f"{__package__}-{self.kind}-server").start()
            self._flight = _Flight(s, functools.partial(_thread_result, box), busy=True,
                                   abort=functools.partial(box["finished"].wait,
                                                           THREAD_STOP_S))

    def _land(self) -> tuple:
        """Wait for the batch :meth:`_launch` started; ``(its buffer set, finished
        episodes)``. Its failure raises here (WorkerError with the remote traceback)."""
        flight = self._flight
        done = flight.land()
        self._flight = None  # only now: on an error, closing still finds the thread
        if self._kind.workers and self._opts.max_restarts:
            self._carry["set"] = flight.s
            self._recover(flight.s, "batch")
        return flight.s, done

    def _recover(self, s: int | None, during: str) -> list:
        """After a batch (into buffer set ``s``), an evaluation or the start: pad the
        columns of the workers that failed in it, replace them, record the restarts."""
        pool, made = self._res.pool, []
        for f in sorted(pool.take_failures(), key=lambda f: f.worker):  # found in any order
            step = None
            if s is not None:
                step = _cut_row(f, self.batch_T)
                _pad(self._sets[s], *self._slices[f.worker], step)
            made.append(Restart(f.worker, list(f.error.envs), during, step, f.error,
                                f.restart))
        try:
            pool.replace_out()
        finally:  # replacements that failed to start (and were replaced in turn)
            made += [Restart(f.worker, list(f.error.envs), "start", None, f.error, f.restart)
                     for f in pool.take_failures()]
            self.restarts.extend(made)
            self._unreported.extend(made)
        if self._kind.served:  # the restarted envs' episodes start afresh (recurrent state)
            for w in sorted({r.worker for r in made}):
                lo, hi = self._slices[w]
                self._collecting_runner.reset_started(np.ones(hi - lo, bool),
                                                      self.env_ids[lo:hi])
        return made

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
            if self._interrupted:  # an in_process batch that finished before it noticed
                self._check_open()
        except BaseException as e:
            reason = (f"worker {e.worker} failed during {what}" if isinstance(e, WorkerError)
                      else f"{type(e).__name__} during {what}")
            locate(e)  # an env's or the agent's error in this process says where
            self._close(graceful=False, reason=reason)
            if self._interrupted and not isinstance(e, (SamplerError, KeyboardInterrupt)):
                # shutdown() from another thread pulled the pipes and processes away.
                raise SamplerClosedError(f"{what}: the {self.kind} sampler was shut down from "
                                         f"another thread while collecting") from e
            raise
        finally:
            self._busy.release()

    # -- evaluation ----------------------------------------------------------------------
    def evaluate_agent(self, itr: int = 0) -> Episodes:
        """Run the agent in eval mode on the eval envs; return finished episodes' TrajInfos.

        Stops after ``eval_max_steps`` env steps in all (``// eval_n_envs`` per env) or
        once ``eval_max_trajectories`` episodes finished, whichever comes first. The list's
        ``restarts`` holds the workers restarted during it (``max_restarts``).
        """
        self._check_open()
        o = self._opts
        if not o.eval_n_envs:
            raise ValueError("evaluate_agent needs eval envs: pass eval_n_envs > 0 (and "
                             "eval_env_fn, which defaults to env_fn) to make_sampler")
        with self._collecting("evaluate_agent"):
            if self._flight is not None and self._flight.busy:
                # policy_lag: the next batch is being collected; let it finish (it is kept
                # for the next call) so that the workers are free to evaluate.
                s, done = self._land()
                self._flight = _Flight(s, lambda: done)
            max_T = o.eval_max_steps // o.eval_n_envs if o.eval_max_steps else UNLIMITED
            max_traj = o.eval_max_trajectories or UNLIMITED
            self._runner.call("eval_mode", itr)
            if self._kind.workers:
                results = self._evaluate_workers(itr, max_T, max_traj)
            else:
                results = self._program.evaluate(itr, max_T, max_traj)
            results.sort(key=lambda r: (r[0], r[1]))
            episodes = Episodes(results[:max_traj])
            episodes.restarts = self._recover(None, "evaluation") if o.max_restarts else []
            return episodes

    def _evaluate_workers(self, itr: int, max_T: int, max_traj: int) -> list:
        """Lockstep: workers report every step; this process counts finished episodes over
        all eval envs and says when to stop, so every kind stops at the same step."""
        pool, runner, ebufs, ctrl = self._res.pool, self._runner, self._ebufs, self._ctrl
        served, n_eval = self._kind.served, self._opts.eval_n_envs
        if self._params is not None:
            load_params(self._params, self._mirror.arrays())
        ctrl[0] = 0
        pool.send(Evaluate(itr, max_T))
        everyone = range(pool.size)
        if served:
            runner.reset_started(np.ones(n_eval, bool), ebufs["env_ids"])
        finished = 0
        for step in range(max_T + 1):
            pool.wait_obs(everyone)
            for w in pool.out:  # failed (max_restarts): its stale columns finish nothing
                ebufs["done"][0, self._eslices[w][0]:self._eslices[w][1]] = False
            if step:
                finished += int(ebufs["done"][0].sum())
            if step == max_T or finished >= max_traj:
                ctrl[0] = 1
                pool.release(everyone)
                break
            if served:
                runner.act(ebufs, 0, 0, n_eval, False, "action server (eval)")
            pool.release(everyone)
        return _merge(pool.gather(everyone))

    # -- shutdown ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed_reason is not None:
            raise SamplerClosedError(f"the {self.kind} sampler is closed ({self._closed_reason}); "
                                     f"make a new one with make_sampler")

    def _close(self, graceful: bool, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        flight = self._flight
        if flight is not None and flight.busy:
            # policy_lag: a batch nobody will read is being collected. Its workers would
            # finish it before reading a Close (or, waiting for actions, never read one):
            # stop them at once; the action server's thread sees the closed sampler first.
            flight.abort()
            graceful = False
        try:
            self._res.close(graceful)  # complete even when a Ctrl-C interrupts it
        finally:
            self._finalizer.detach()

    def shutdown(self) -> None:
        """Stop workers and release shared memory; idempotent. Called from another thread
        while a batch is being collected, it stops the workers at once (``serial``: the
        collecting thread stops at its next check, within POLL_S, and closes the envs it
        was stepping), and the collecting thread raises :class:`SamplerClosedError`."""
        if self._busy.acquire(blocking=False):
            try:
                self._close(graceful=True, reason="shut down")
            finally:
                self._busy.release()
        else:
            self._interrupted = True
            if not self._kind.workers:
                self._closed_reason = self._closed_reason or "shut down while collecting"
                return
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

    def _make_batch(self, b: dict) -> Batch:
        T = self.batch_T
        batch = Batch(observation=tree_map(lambda a: a[:T], b["observation_full"]),
                      prev_action=b["prev_action_full"][:T], prev_reward=b["prev_reward_full"][:T])
        # The rest as laid out (probe.batch_specs): action .. env_info, then the optional ones.
        batch.update((k, v) for k, v in b.items() if not k.endswith("_full") and k != "env_ids")
        return batch


def _serve_batch(pool: Pool, bufs: dict, runner: AgentRunner, groups: list, group_envs: list,
                 wait: bool, overlap: bool, itr: int, s: int, bootstrap_fn: Callable) -> list:
    """The action server for one batch into buffer set ``s``: per step, per group of
    workers, wait for observations, act, release (after the next group's observations
    are in, without ``overlap``); then the workers' finished episodes and the bootstrap
    values."""
    pool.send(Collect(itr, s))
    pending: list = []  # without overlap: the group served last, released after the next
    for t in range(len(bufs["action"])):
        for workers, (lo, hi) in zip(groups, group_envs):
            pool.wait_obs(workers)
            pool.release(pending)
            runner.act(bufs, t, lo, hi, wait, "action server")
            if overlap:
                pool.release(workers)
            else:
                pending = workers
    pool.release(pending)
    done = _merge(pool.gather(range(pool.size)))
    if "bootstrap_value" in bufs:
        bootstrap_fn(bufs, runner, 0, len(bufs["env_ids"]))
    return done


def _serve_in_thread(serve: Callable[[], list], box: dict) -> None:
    """``serve()`` beside the caller's training (policy_lag): the result or the error goes
    into ``box``, then ``box["finished"]`` is set (an Event, as a join interrupted by
    Ctrl-C can leave a thread looking finished)."""
    try:
        box["done"] = serve()
    except BaseException as e:  # noqa: B036 - everything must reach the caller's thread
        box["error"] = e
    finally:
        box["finished"].set()


def _thread_result(box: dict) -> list:
    """Wait for :func:`_serve_in_thread` (in slices: a Ctrl-C is seen meanwhile)."""
    while not box["finished"].wait(THREAD_JOIN_SLICE_S):
        pass
    if "error" in box:
        raise box["error"]
    return box["done"]


# -- restarts (max_restarts) -------------------------------------------------------------
def _cut_row(f: Failure, T: int) -> int:
    """The batch row a failed worker's columns are cut at: the step it was in (acting,
    stepping, waiting for actions), T for its bootstrap value; 0 if it failed before it
    started the batch (idle, or resetting waiting envs); the row its error names if that
    comes first (a value found bad at the end of the batch)."""
    row = 0
    if f.beat is not None:
        _, phase, t, _ = f.beat
        row = min(t, T) if phase in (AGENT, STEP, WAIT, HANDED) else 0
    return row if f.step is None else min(row, f.step)


def _pad(bufs: dict, lo: int, hi: int, t: int) -> None:
    """The restart rule for columns ``lo:hi`` of a batch cut at row ``t``: the episodes
    still running after row t-1 end there, truncated (their final observation: row t's);
    rows t.. are padding as in wait mode: zeros, done and truncated; no bootstrap value."""
    cols = slice(lo, hi)
    T = len(bufs["done"])
    if t >= 1:
        going = lo + np.flatnonzero(~bufs["done"][t - 1, cols])
        bufs["truncated"][t - 1, going] = True
        bufs["done"][t - 1, going] = True
        if "final_observation" in bufs:
            for (_, fin), (_, obs) in zip(tree_leaves(bufs["final_observation"]),
                                          tree_leaves(bufs["observation_full"])):
                fin[t - 1, going] = obs[t, going]
    for key in bufs.keys() - {"env_ids", "bootstrap_value"}:  # rows t.. (none if t == T)
        for _, a in tree_leaves(bufs[key]):
            a[t:T, cols] = 0
    bufs["truncated"][t:T, cols] = True
    bufs["done"][t:T, cols] = True
    if "bootstrap_value" in bufs:
        bufs["bootstrap_value"][cols] = 0


def _merge(replies: dict) -> list:
    """The workers' ``(step, env, TrajInfo)`` lists as one, in step and env order."""
    return sorted((r for done in replies.values() for r in done), key=lambda r: (r[0], r[1]))


def _warn_unmirrored(agent: Any, mirror: Params, server: bool = False) -> None:
    """Say once, at construction, if a copy of the agent (a cpu worker's, or the action
    server's with policy_lag) would keep arrays frozen."""
    if mirror.explicit:
        return  # the agent says what to mirror: its shared_arrays() is the rule
    frozen = unmirrored_arrays(agent)
    if frozen:
        who = ("with policy_lag=1 this kind serves actions from a copy of the agent" if server
               else "the cpu kind runs a copy of the agent in every worker")
        fix = ("or use policy_lag=0 or the 'serial' kind" if server else
               "or use the 'gpu' or 'serial' kind, where this process runs the agent itself")
        warn(f"{who}, and this agent holds float arrays outside any torch module "
             f"({', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}): the copies "
             f"would keep them at their initial values, whatever the training loop does to "
             f"them here. Give the agent a shared_arrays() method returning them (a dict of "
             f"arrays updated in place; it is copied into the copies before each batch), "
             f"{fix}")


def _slices(n: int, workers: int, width: int) -> list:
    """Per worker, its ``(lo, hi)`` columns: whole envs of ``width`` columns each."""
    return [(lo * width, hi * width) for lo, hi in split(n // width, workers)]


def _check_vector(o: Options, form: Form, eform: Form) -> None:
    """Vector envs: batch_B (eval_n_envs) must be whole vector envs, and wait mode cannot be
    honoured; a clear error before any process starts."""
    for (vector, width), n, name, fn in ((form, o.batch_B, "batch_B", "env_fn"),
                                         (eform, o.eval_n_envs, "eval_n_envs", "eval_env_fn")):
        if vector and n % width:
            fit = (n // width) * width
            raise ValueError(
                f"{name}={n} is not a multiple of num_envs={width}: {fn}() returns vector "
                f"envs of {width} sub-envs, and each fills {width} columns. Use {name}="
                f"{max(fit, width)}{f' or {fit + width}' if fit else ''} (or a vector env "
                f"whose num_envs divides {n})")
    if form.vector and o.reset_mode == "wait":  # (evaluations never wait)
        raise ValueError(
            "reset_mode='wait' cannot be honoured with vector envs: it holds an env whose "
            "episode ended until the next batch, and a vector env steps all its sub-envs "
            "together. Use reset_mode='mid_batch' (the default)")
