"""The one process loop behind every parallel kind.

Imports the collector and agents modules; nothing imports it but :mod:`sampling.samplers`.
A worker owns a slice of envs (and of eval envs), writes its columns of the shared
batch, and either runs its own copy of the agent (``cpu``) or hands observations to
the parent and waits for actions (action-server kinds). Everything, ``env_fn()``
included, runs inside one ``try``: any failure reaches the parent as a message with
the traceback, and a worker whose parent is gone exits on its own.
"""
from __future__ import annotations

import faulthandler
import gc
import multiprocessing as mp
import os
import pickle
import signal
import sys
import traceback
from time import perf_counter

try:
    from os import sched_yield
except ImportError:  # not on every platform
    def sched_yield() -> None:
        pass

import numpy as np

from .agent_state import Params, load_params, reseed, worker_seed
from .agents import AgentRunner, write_checked
from .buffers import SharedBuffer, views
from .collector import (
    AGENT,
    EVAL,
    EVAL_MAKE,
    EVAL_RESET,
    IDLE,
    MAKE,
    STEP,
    Collector,
    make_env,
    mark,
)
from .tree import is_tree, tree_leaves, tree_map

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
# With a step deadline, the parent sends this signal to a stuck worker, whose faulthandler
# then writes every thread's Python stack to its stack pipe.
STACK_SIGNAL = getattr(signal, "SIGUSR1", None)


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
    pass


class Terminated(BaseException):
    """Raised in a worker by SIGTERM (the parent stopping it, or anyone else): it unwinds
    to ``worker_main``'s ``finally``, which closes the envs. A BaseException, so that an
    env's ``except Exception`` cannot swallow it."""


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


def _close_envs(envs: list) -> None:
    """Close every env once (each is taken off ``envs`` first), ignoring their errors."""
    while envs:
        env = envs.pop(0)
        try:
            env.close()
        except Exception:
            pass


class Handoff:
    """The worker's side of the per-step exchange with an action server."""

    def __init__(self, obs_ready, act_ready):
        self.obs_ready, self.act_ready = obs_ready, act_ready
        self.ppid = os.getppid()
        self.parent = mp.parent_process()

    def parent_alive(self) -> bool:
        return os.getppid() == self.ppid and (self.parent is None or self.parent.is_alive())

    def check_parent(self) -> None:
        if not self.parent_alive():
            raise ParentGone

    def exchange(self) -> None:
        """Tell the parent this step's observations are written; wait for its actions."""
        self.obs_ready.release()
        acquire(self.act_ready, self.check_parent)


def _recv(conn, handoff: Handoff):
    while not conn.poll(POLL_S):
        if not handoff.parent_alive():
            raise ParentGone
    return conn.recv()


def run_batch(coll: Collector, runner, handoff, bufs: dict) -> list:
    """Collect one ``[T, slice]`` batch, with the local agent or through the handoff."""
    coll.begin_batch()
    lo, hi, wait, where, beat = coll.lo, coll.hi, coll.wait, coll.where, coll.beat
    check_at = perf_counter() + POLL_S
    for t in range(coll.T):
        if runner is None:
            if beat is not None:
                mark(beat, IDLE)  # the parent computes actions: no deadline runs
            handoff.exchange()
        else:
            if beat is not None:
                mark(beat, AGENT, t)
            runner.act(bufs, t, lo, hi, wait, where)
            if handoff is not None and perf_counter() > check_at:
                # A cpu worker waits on nobody mid-batch: look for its parent now and then,
                # so a long batch cannot outlive a killed parent by more than POLL_S.
                handoff.check_parent()
                check_at = perf_counter() + POLL_S
        if beat is not None:
            mark(beat, STEP, t)
        coll.step_envs(t)
    return coll.end_batch()


def run_eval(coll: Collector, runner, handoff, bufs: dict, max_steps: int, max_traj: int,
             ctrl: np.ndarray) -> list:
    """Step eval envs until ``max_steps`` or ``max_traj`` finished episodes.

    Returns ``(step, env, TrajInfo)`` tuples. In a worker every step goes through the
    handoff and the parent decides when to stop (``ctrl[0]``), counting finished episodes
    over all workers: that lockstep makes evaluation identical in every kind.
    """
    results = []
    lo, hi, where, beat = coll.lo, coll.hi, coll.where, coll.beat
    for step in range(max_steps + 1):
        coll.begin_batch()
        if handoff is not None:
            mark(beat, IDLE)
            handoff.exchange()
            stop = ctrl[0]
        else:
            stop = step == max_steps or len(results) >= max_traj
        if stop:
            break
        if runner is not None:
            mark(beat, AGENT, step)
            runner.act(bufs, 0, lo, hi, False, where)
        mark(beat, EVAL, step)
        coll.step_envs(0)
        results.extend((step, b, traj) for _, b, traj in coll.end_batch())
    return results


def restart_eval(coll: Collector, runner, seed: int, first: bool) -> None:
    """Reset eval envs at the start of an evaluation (seeded only the first time)."""
    c = coll.cols
    for j, env in enumerate(coll.envs):
        mark(coll.beat, EVAL_RESET, 0, j)
        o, _ = env.reset(seed=seed + coll.lo + j) if first else env.reset()
        coll.write_obs(1, j, o)
    c["prev_action_full"][1] = 0
    c["prev_reward_full"][1] = 0
    c["done"][...] = False
    coll.waiting = [False] * len(coll.envs)
    coll.trajs = [coll.new_traj() for _ in coll.envs]
    if runner is not None:
        runner.reset_started(np.ones(len(coll.envs), bool), coll.bufs["env_ids"][coll.lo:coll.hi])


def worker_main(w: int, payload, shm_name: str, nbytes: int, placed: dict, conn,
                obs_ready, act_ready, stack_pipe=None) -> None:
    """Entry point of worker ``w`` (the target of every worker process)."""
    # First of all, say that the process got this far: a worker that dies before this
    # message failed in multiprocessing's start-up (importing the main module under
    # spawn/forkserver, unpickling its arguments), and the parent says so.
    try:
        conn.send(("started",))
    except OSError:  # the parent is gone already
        return
    global _closing
    _closing = False
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # SIGTERM (how the parent stops a worker on every path but a graceful shutdown, and how
    # schedulers stop jobs) unwinds to the finally below, which closes the envs. A worker in
    # a blocking C call gets it when the call returns; one that never returns is SIGKILLed
    # by the parent after its grace period (samplers.TERMINATE_GRACE_S).
    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "pthread_sigmask"):  # the parent started us with SIGINT blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    handoff = Handoff(obs_ready, act_ready)
    envs, eval_envs = [], []
    terminated = False
    try:
        if isinstance(payload, bytes):
            import cloudpickle
            payload = cloudpickle.loads(payload)
        cfg = payload
        lo, hi = cfg["slice"]
        elo, ehi = cfg["eval_slice"]
        where = f"worker {w}"
        shared = SharedBuffer(nbytes, name=shm_name)
        arrays = views(shared.buf, placed)
        bufs, ebufs, ctrl = arrays["main"], arrays.get("eval"), arrays["ctrl"]
        # With a step deadline: progress marks for the parent to watch, and the Python
        # stack written to stack_pipe on STACK_SIGNAL (from C: even an env stuck in C code).
        beat = memoryview(arrays["beats"][w]) if "beats" in arrays else None
        if stack_pipe is not None:
            faulthandler.register(STACK_SIGNAL, file=stack_pipe.fileno(), all_threads=True)
        _limit_threads(cfg["torch_threads"])
        if cfg["cpu_affinity"] is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cfg["cpu_affinity"])
        # This worker's random streams: global ones (for env_fn and envs that use them)
        # and, once env_fn may have imported torch, torch's and the agent's own generators.
        seeds = worker_seed(cfg["seed"], lo)
        reseed(None, seeds)
        env_fn = cfg["env_fn"]
        for b in range(lo, hi):  # one by one: a SIGTERM meanwhile closes those built so far
            mark(beat, MAKE, 0, b - lo)
            envs.append(make_env(env_fn, f"env {b}"))
        reseed(cfg["agent"], seeds)
        runner = AgentRunner(cfg["agent"]) if cfg["agent"] is not None else None
        bufs["env_ids"] = np.arange(cfg["batch_B"])
        coll = Collector(envs, lo, bufs, batch_T=cfg["batch_T"], wait=cfg["wait"],
                         traj_info=cfg["traj_info"], where=where)
        coll.beat = beat
        if runner is not None:
            runner.call("reset")
        coll.reset_all(cfg["seed"], cfg["max_decorrelation_steps"])
        _limit_threads(cfg["torch_threads"])  # env_fn may have imported torch
        shared_params = arrays.get("params")
        mirror = _mirror(runner, shared_params)
        # Everything built so far lives as long as the worker: keep the cyclic collector
        # from walking it again and again (a full collection mid-batch stalls every worker).
        gc.freeze()
        mark(beat, IDLE)
        conn.send(("ready",))
        ecoll, first_eval = None, True
        while True:
            msg = _recv(conn, handoff)
            cmd = msg[0]
            if cmd == "batch":
                itr = msg[1]
                if runner is not None:
                    if mirror is not None:
                        load_params(mirror.arrays(), shared_params)
                    runner.call("sample_mode", itr)
                done = run_batch(coll, runner, handoff, bufs)
                if runner is not None and "bootstrap_value" in bufs:
                    T = coll.T
                    mark(beat, AGENT, T)
                    v = runner.value(_rows(bufs["observation_full"], T, lo, hi),
                                     bufs["prev_action_full"][T, lo:hi],
                                     bufs["prev_reward_full"][T, lo:hi], bufs["env_ids"][lo:hi])
                    write_checked(bufs["bootstrap_value"][lo:hi], v,
                                  f"bootstrap value for envs {lo}..{hi - 1} ({where})",
                                  "agent.value returned")
                mark(beat, IDLE)
                conn.send(("done", done))
            elif cmd == "eval":
                itr, max_steps = msg[1], msg[2]
                if ecoll is None:
                    eval_env_fn = cfg["eval_env_fn"]
                    for e in range(elo, ehi):
                        mark(beat, EVAL_MAKE, 0, e - elo)
                        eval_envs.append(make_env(eval_env_fn, f"eval env {e}", "eval_env_fn"))
                    ebufs["env_ids"] = np.arange(cfg["batch_B"], cfg["batch_B"] + cfg["eval_n"])
                    ecoll = Collector(eval_envs, elo, ebufs, batch_T=1, wait=False,
                                      traj_info=cfg["traj_info"], where=where, label="eval env")
                    ecoll.beat = beat
                if runner is not None:
                    if mirror is not None:
                        load_params(mirror.arrays(), shared_params)
                    runner.call("eval_mode", itr)
                restart_eval(ecoll, runner, cfg["seed"] + cfg["batch_B"], first_eval)
                first_eval = False
                results = run_eval(ecoll, runner, handoff, ebufs, max_steps, 0, ctrl)
                mark(beat, IDLE)
                conn.send(("done", results))
            elif cmd == "close":
                break
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
        _close_envs(envs + eval_envs)
    if terminated:
        # Die of SIGTERM as the default action would have: the exit status says so, and
        # the parent's error (for a SIGTERM it did not send) names the signal.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os.kill(os.getpid(), signal.SIGTERM)


def _rows(tree, t, lo, hi):
    return tree_map(lambda a: a[t, lo:hi], tree) if is_tree(tree) else tree[t, lo:hi]


def _report(conn, e: BaseException) -> None:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        # Some exceptions pickle but fail to unpickle (custom __init__ signatures): check here,
        # where a stand-in can still carry the message and the traceback.
        pickle.loads(pickle.dumps(e))
    except Exception:
        stand_in = RuntimeError(f"{type(e).__name__}: {e}")
        stand_in.sampling_where = getattr(e, "sampling_where", None)
        e = stand_in
    try:
        conn.send(("error", e, tb))
    except Exception:
        pass  # the pipe is gone: the parent learns from the exit code


def _limit_threads(n) -> None:
    torch = sys.modules.get("torch")
    if n is not None and torch is not None:
        torch.set_num_threads(n)


def _mirror(runner, shared: dict | None) -> Params | None:
    """This copy's parameters, checked to match the parent's (see agent_state.Params)."""
    if runner is None or not shared:
        return None
    mirror = Params(runner.agent)
    own = {path for path, _ in tree_leaves(mirror.arrays())}
    theirs = {path for path, _ in tree_leaves(shared)}
    if own != theirs:
        raise RuntimeError(
            f"this worker's copy of the agent has parameters {sorted(own - theirs)[:3]} that "
            f"the parent's lacks, or lacks {sorted(theirs - own)[:3]}: the copy is built "
            f"differently from the original (e.g. modules made at random or per process). "
            f"Give the agent a shared_arrays() method that returns the same arrays in every "
            f"copy")
    return mirror
