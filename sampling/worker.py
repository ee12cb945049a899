"""The one program that collects, evaluates and bootstraps a slice of envs.

Imports collector, agents, agent_state, errors, pool, tree and vector. A :class:`Program` owns
a slice of envs (and of eval envs), writes its columns of the batch, and either runs an
agent on them (a ``cpu`` worker's copy, or the serial sampler's own agent) or hands
observations to the parent and waits for actions (``served``). The pool runs it in each
worker process (:func:`run`: commands :class:`Collect`, :class:`Evaluate`, the pool's
Close); the serial sampler runs it in its own process, through a :class:`LocalLink`.
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Callable

import numpy as np

from .agent_state import Params, check_same_params, load_params, reseed, worker_seed
from .agents import AgentRunner, write_checked
from .collector import (
    AGENT,
    BATCH_RESET,
    DECORRELATE,
    EVAL,
    EVAL_MAKE,
    EVAL_RESET,
    HANDED,
    IDLE,
    MAKE,
    RESET,
    STEP,
    WAIT,
    Numbering,
    make_env,
    mark,
)
from .errors import env_name
from .pool import POLL_S, Close, Done, Link, Ready
from .tree import is_tree, tree_map
from .vector import Form, collector

__all__ = ["WorkerConfig", "Collect", "Evaluate", "LocalLink", "Program", "run", "bootstrap",
           "buffer_sets", "limit_threads", "pin", "deadline", "stuck_text",
           "ENV_FN_TIMEOUT_FACTOR"]

# env_fn() builds a simulator (loads assets, compiles, connects): its deadline is this many
# times step_timeout.
ENV_FN_TIMEOUT_FACTOR = 10


@dataclass
class WorkerConfig:
    """What one program needs (sent once to a worker, at its start)."""

    index: int
    env_fn: Callable[[], Any]
    eval_env_fn: Callable[[], Any]
    agent: Any                 # None: the parent serves actions
    batch_T: int
    batch_B: int
    eval_n: int
    wait: bool                 # reset_mode == "wait"
    seed: int
    max_decorrelation_steps: int
    traj_info: Callable[[], Any]
    torch_threads: int | None
    envs: tuple                # (lo, hi): its columns of the batch
    eval_envs: tuple           # (lo, hi): its columns of the evaluation buffers
    cpu_affinity: list | None
    form: Form = Form()        # what env_fn's envs are (see sampling.vector)
    eval_form: Form = Form()   # the same for eval_env_fn's
    rank: int = 0              # of world_size ranks (see collector.Numbering)
    world_size: int = 1
    restart: int = 0           # how many times this worker was restarted (fresh seeds)
    start_set: int = 0         # the buffer set the next batch carries row T from
    in_process: bool = False   # the serial sampler's: the agent is the user's own
    where: str = "worker 0"    # who steps these envs, for messages


@dataclass(frozen=True)
class Collect:
    """P -> w: collect one batch into buffer set ``buf`` (two with policy_lag); ``itr``
    reaches the agent's ``sample_mode``."""

    itr: int
    buf: int = 0


@dataclass(frozen=True)
class Evaluate:
    """P -> w: run an evaluation, at most ``max_steps`` steps, in lockstep with the parent."""

    itr: int
    max_steps: int


class LocalLink:
    """A :class:`~sampling.pool.Link` for a program in this process (serial): no pipe, no
    beat; ``check_parent()`` raises once the sampler is closed (from another thread), and
    ``envs`` is the sampler's list of envs to close."""

    beat = None

    def __init__(self, check: Callable[[], None], envs: list):
        self.check_parent = check
        self.envs = envs


def buffer_sets(arrays: dict, num: Numbering) -> list:
    """The batch buffer sets of a layout (one, or two with policy_lag), each with its
    ``env_ids``; the eval buffers get theirs too."""
    sets = [arrays[key] for key in ("main", "main1") if key in arrays]
    for bufs in sets:
        bufs["env_ids"] = num.env_ids()
    if "eval" in arrays:
        arrays["eval"]["env_ids"] = num.eval_ids()
    return sets


def run_batch(coll, runner: AgentRunner | None, link: Any, bufs: dict) -> list:
    """Collect one ``[T, slice]`` batch, with an agent (``runner``) or, without one,
    through the parent's action server (``link``)."""
    coll.begin_batch()
    lo, hi, wait, where, beat = coll.lo, coll.hi, coll.wait, coll.where, coll.beat
    check_at = perf_counter() + POLL_S
    for t in range(coll.batch_T):
        if runner is None:
            mark(beat, WAIT, t)  # the parent computes actions (see pool.Pool.hand)
            link.exchange()
        else:
            mark(beat, AGENT, t)
            runner.act(bufs, t, lo, hi, wait, where)
            if perf_counter() > check_at:
                # With its own agent nobody is waited on mid-batch: look for the parent (or
                # a shutdown from another thread) now and then, so a long batch cannot
                # outlive either by more than POLL_S.
                link.check_parent()
                check_at = perf_counter() + POLL_S
        mark(beat, STEP, t)
        coll.step_envs(t)
    return coll.end_batch()


def run_eval(coll, runner: AgentRunner | None, link: Any, bufs: dict, max_steps: int,
             max_traj: int, ctrl: np.ndarray, lockstep: bool) -> list:
    """Step eval envs until ``max_steps`` or ``max_traj`` finished episodes; returns
    ``(step, env, TrajInfo)`` tuples.

    In ``lockstep`` (workers) every step goes through the handoff and the parent decides
    when to stop (``ctrl[0]``), counting finished episodes over all workers: that makes
    evaluation identical in every kind. In this process, the program counts itself.
    """
    results = []
    for step in range(max_steps + 1):
        coll.begin_batch()
        if lockstep:
            mark(coll.beat, IDLE)
            link.exchange()
            stop = ctrl[0]
        else:
            link.check_parent()  # shut down meanwhile
            stop = step == max_steps or len(results) >= max_traj
        if stop:
            break
        if runner is not None:
            mark(coll.beat, AGENT, step)
            runner.act(bufs, 0, coll.lo, coll.hi, False, coll.where)
        mark(coll.beat, EVAL, step)
        coll.step_envs(0)
        results.extend((step, b, traj) for _, b, traj in coll.end_batch())
    return results


def bootstrap(bufs: dict, runner: AgentRunner, lo: int, hi: int, num: Numbering,
              where: str) -> None:
    """``bootstrap_value`` of envs ``lo:hi``: the agent's value of the observation after
    the last step (by the agent that collected them)."""
    T = len(bufs["action"])
    obs = bufs["observation_full"]
    rows = tree_map(lambda a: a[T, lo:hi], obs) if is_tree(obs) else obs[T, lo:hi]
    v = runner.value(rows, bufs["prev_action_full"][T, lo:hi],
                     bufs["prev_reward_full"][T, lo:hi], bufs["env_ids"][lo:hi])
    write_checked(bufs["bootstrap_value"][lo:hi], v,
                  f"bootstrap value for envs {num.first + lo}..{num.first + hi - 1} ({where})",
                  "agent.value returned")


class Program:
    """One slice's envs, collectors, agent and mirrored parameters.

    In a worker (``cfg.in_process`` false) the agent is the worker's own copy: it gets
    fresh random streams and, before every batch, the parent's parameters. In this
    process it is the caller's agent, left as it is (``runner`` is the sampler's, and
    ``spare_eval`` an eval env the sampler built already)."""

    def __init__(self, link: Any, arrays: dict, cfg: WorkerConfig,
                 runner: AgentRunner | None = None, spare_eval: Any = None):
        self.link, self.cfg, self.arrays = link, cfg, arrays
        num = self.num = Numbering(cfg.rank, cfg.world_size, cfg.batch_B, cfg.eval_n)
        self.sets = buffer_sets(arrays, num)
        self.ctrl = arrays["ctrl"]
        self.where = cfg.where
        lo, hi = cfg.envs
        if not cfg.in_process:
            limit_threads(cfg.torch_threads)
            pin(cfg.cpu_affinity)
            # This worker's random streams: global ones (for env_fn and envs that use
            # them) and, once env_fn may have imported torch, torch's and the agent's.
            seeds = worker_seed(cfg.seed, num.first + lo, cfg.restart)
            reseed(None, seeds)
        self.envs = self._make(cfg.env_fn, cfg.form, lo, hi, num.first, "env", MAKE)
        if not cfg.in_process:
            reseed(cfg.agent, seeds)
        self.runner = runner
        if runner is None and cfg.agent is not None:
            self.runner = AgentRunner(cfg.agent)
        self.coll = collector(list(self.envs), lo, self.sets[0], cfg.form, batch_T=cfg.batch_T,
                              wait=cfg.wait, traj_info=cfg.traj_info, where=self.where,
                              spare=self.sets[1] if len(self.sets) > 1 else None,
                              first=num.first, beat=link.beat, restart=cfg.restart,
                              start_set=cfg.start_set)
        if self.runner is not None:
            self.runner.call("reset")
        self.coll.reset_all(cfg.seed, cfg.max_decorrelation_steps)
        self.params = arrays.get("params")
        self.mirror = None
        if not cfg.in_process:
            limit_threads(cfg.torch_threads)  # env_fn may have imported torch
            if self.runner is not None and self.params:
                # This copy's parameters, checked to match the parent's (agent_state.Params).
                self.mirror = Params(self.runner.agent)
                check_same_params(self.mirror.arrays(), self.params,
                                  "this worker's copy of the agent")
        self.spare_eval, self.ecoll, self.first_eval = spare_eval, None, True

    def _make(self, fn: Callable, form: Form, lo: int, hi: int, first: int, label: str,
              phase: int, spare: Any = None) -> list:
        """Build this slice's envs (or eval envs) one by one, each added to ``link.envs``
        at once: a SIGTERM meanwhile closes those built so far. ``spare``: the first one,
        built already (and closed by its owner)."""
        built, width = [] if spare is None else [spare], form.width
        for v in range(lo // width + len(built), hi // width):
            mark(self.link.beat, phase, 0, v * width - lo)
            name = env_name(first + v * width, label=label, width=width if form.vector else None)
            built.append(make_env(fn, name, "env_fn" if label == "env" else "eval_env_fn"))
            self.link.envs.append(built[-1])
        return built

    def _enter_mode(self, mode: str, itr: int) -> None:
        """A worker's copy takes the parent's parameters, then the mode (in this process
        the sampler calls the mode on its agent itself)."""
        if self.runner is not None and not self.cfg.in_process:
            if self.mirror is not None:
                load_params(self.mirror.arrays(), self.params)
            self.runner.call(mode, itr)

    def collect(self, itr: int, buf: int) -> list:
        """One batch into buffer set ``buf``; the finished episodes."""
        runner, bufs, beat = self.runner, self.sets[buf], self.link.beat
        self._enter_mode("sample_mode", itr)
        self.coll.use(buf)
        done = run_batch(self.coll, runner, self.link, bufs)
        if runner is not None and "bootstrap_value" in bufs:
            mark(beat, AGENT, self.coll.batch_T)
            bootstrap(bufs, runner, *self.cfg.envs, self.num, self.where)
        mark(beat, IDLE)
        return done

    def evaluate(self, itr: int, max_steps: int, max_traj: int = 0) -> list:
        """One evaluation; the finished episodes as ``(step, env, TrajInfo)``."""
        cfg, ebufs, ecoll = self.cfg, self.arrays["eval"], self.ecoll
        if ecoll is None:
            (elo, ehi), first = cfg.eval_envs, self.num.eval_first
            built = self._make(cfg.eval_env_fn, cfg.eval_form, elo, ehi, first, "eval env",
                               EVAL_MAKE, self.spare_eval)
            ecoll = self.ecoll = collector(built, elo, ebufs, cfg.eval_form, batch_T=1,
                                           wait=False, traj_info=cfg.traj_info,
                                           where=self.where, label="eval env", first=first,
                                           beat=self.link.beat, restart=cfg.restart)
        self._enter_mode("eval_mode", itr)
        ecoll.restart(cfg.seed, self.first_eval)  # its envs' reset (seeded the first time)
        self.first_eval = False
        if self.runner is not None:
            self.runner.reset_started(np.ones(ecoll.n, bool), ebufs["env_ids"][ecoll.lo:ecoll.hi])
        results = run_eval(ecoll, self.runner, self.link, ebufs, max_steps, max_traj,
                           self.ctrl, lockstep=not cfg.in_process)
        mark(self.link.beat, IDLE)
        return results


def run(link: Link, arrays: dict, cfg: WorkerConfig) -> None:
    """The worker program: build the envs, say Ready, then serve commands until Close."""
    program = Program(link, arrays, cfg)
    # Everything built so far lives as long as the worker: keep the cyclic collector
    # from walking it again and again (a full collection mid-batch stalls every worker).
    gc.freeze()
    mark(link.beat, IDLE)
    link.send(Ready())
    while True:
        cmd = link.recv()
        if isinstance(cmd, Collect):
            link.send(Done(program.collect(cmd.itr, cmd.buf)))
        elif isinstance(cmd, Evaluate):
            link.send(Done(program.evaluate(cmd.itr, cmd.max_steps)))
        elif isinstance(cmd, Close):
            return
        else:
            raise TypeError(f"unknown command {cmd!r} (a bug in the sampler)")


def limit_threads(n: int | None) -> None:
    """torch's threads in this process, if torch is loaded (None: leave them)."""
    torch = sys.modules.get("torch")
    if n is not None and torch is not None:
        torch.set_num_threads(n)


def pin(cpus: list | None) -> None:
    """Pin this process to ``cpus`` (where the platform can)."""
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


# -- the step deadline (the pool asks; module functions, so that the pool holds no
# reference to its owner, which a finalizer must be able to collect) -------------------
def deadline(step_timeout: float | None, phase: int) -> float | None:
    """Seconds a worker may stay in ``phase`` (None: it waits for this process, or there
    is no deadline: beats only tell where workers are, for max_restarts)."""
    if step_timeout is None or phase in (IDLE, WAIT):
        return None
    return step_timeout * (ENV_FN_TIMEOUT_FACTOR if phase in (MAKE, EVAL_MAKE) else 1)


def stuck_text(step_timeout: float, named: list, enamed: list, form: Form, eform: Form,
                w: int, phase: int, t: int, j: int, limit: float) -> str:
    """What worker w did not finish in time, for its WorkerError (``j``: the column within
    its slice, the first of a vector env's; envs by global index)."""
    lo, hi = named[w]
    env = (f"envs {lo}..{hi - 1}" if j < 0 else
           env_name(lo + j, width=form.width if form.vector else None))
    eval_env = env_name(enamed[w][0] + max(j, 0), label="eval env",
                        width=eform.width if eform.vector else None)
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
            EVAL_RESET: f"the reset of {eval_env} before an evaluation {late}",
            HANDED: "it did not take up what this process handed it (a command, or the "
                    "actions of a step): the process is stopped (SIGSTOP, a debugger) or "
                    "starved of CPU,"}[phase]
    within = (f"{limit:g} s ({ENV_FN_TIMEOUT_FACTOR} x step_timeout)"
              if phase in (MAKE, EVAL_MAKE) else f"step_timeout={step_timeout:g} s")
    return f"{what} within {within}"

