"""The program every parallel kind's workers run (started by :mod:`sampling.pool`).

Imports collector, agents, agent_state, pool, tree and vector. A worker owns a slice of envs (and
of eval envs), writes its columns of the shared batch, and either runs its own copy of the
agent (the ``worker_agents`` driver) or hands observations to the parent and waits for
actions (``served``). Commands: :class:`Collect`, :class:`Evaluate`, and the pool's Close.
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Callable

import numpy as np

from .agent_state import Params, load_params, reseed, worker_seed
from .agents import AgentRunner, write_checked
from .collector import (
    AGENT,
    EVAL,
    EVAL_MAKE,
    IDLE,
    MAKE,
    STEP,
    WAIT,
    Collector,
    Numbering,
    make_env,
    mark,
)
from .pool import POLL_S, Close, Done, Link, Ready
from .tree import is_tree, tree_leaves, tree_map
from .vector import collector, env_label

__all__ = ["WorkerConfig", "Collect", "Evaluate", "run", "run_batch", "run_eval",
           "restart_eval"]


@dataclass
class WorkerConfig:
    """What one worker needs (sent once, at start)."""

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
    form: tuple = (False, 1)       # (vector, width) of env_fn's envs (see sampling.vector)
    eval_form: tuple = (False, 1)  # the same for eval_env_fn's
    rank: int = 0                  # of world_size ranks (see collector.Numbering)
    world_size: int = 1
    restart: int = 0               # how many times this worker was restarted (fresh seeds)
    start_set: int = 0             # the buffer set the next batch carries row T from

    @property
    def numbering(self) -> Numbering:
        return Numbering(self.rank, self.world_size, self.batch_B, self.eval_n)


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


def run_batch(coll: Collector, runner, link, bufs: dict) -> list:
    """Collect one ``[T, slice]`` batch, with the local agent (``runner``) or, without
    one, through the parent's action server (``link``)."""
    coll.begin_batch()
    lo, hi, wait, where, beat = coll.lo, coll.hi, coll.wait, coll.where, coll.beat
    check_at = perf_counter() + POLL_S
    for t in range(coll.T):
        if runner is None:
            if beat is not None:
                mark(beat, WAIT, t)  # the parent computes actions: no deadline runs
            link.exchange()
        else:
            if beat is not None:
                mark(beat, AGENT, t)
            runner.act(bufs, t, lo, hi, wait, where)
            if link is not None and perf_counter() > check_at:
                # A worker with its own agent waits on nobody mid-batch: look for its parent
                # now and then, so a long batch cannot outlive a killed parent by more than
                # POLL_S.
                link.check_parent()
                check_at = perf_counter() + POLL_S
        if beat is not None:
            mark(beat, STEP, t)
        coll.step_envs(t)
    return coll.end_batch()


def run_eval(coll: Collector, runner, link, bufs: dict, max_steps: int, max_traj: int,
             ctrl: np.ndarray, check: Callable[[], None] | None = None) -> list:
    """Step eval envs until ``max_steps`` or ``max_traj`` finished episodes.

    Returns ``(step, env, TrajInfo)`` tuples. In a worker every step goes through the
    handoff and the parent decides when to stop (``ctrl[0]``), counting finished episodes
    over all workers: that lockstep makes evaluation identical in every kind. In this
    process (no ``link``), ``check()`` runs before every step.
    """
    results = []
    where, beat = coll.where, coll.beat
    for step in range(max_steps + 1):
        coll.begin_batch()
        if link is not None:
            mark(beat, IDLE)
            link.exchange()
            stop = ctrl[0]
        else:
            if check is not None:  # in this process: stop if shut down meanwhile
                check()
            stop = step == max_steps or len(results) >= max_traj
        if stop:
            break
        if runner is not None:
            mark(beat, AGENT, step)
            runner.act(bufs, 0, coll.lo, coll.hi, False, where)
        mark(beat, EVAL, step)
        coll.step_envs(0)
        results.extend((step, b, traj) for _, b, traj in coll.end_batch())
    return results


def restart_eval(coll: Collector, runner, seed: int, first: bool) -> None:
    """Reset eval envs at the start of an evaluation (seeded only the first time)."""
    coll.restart(seed, first)
    if runner is not None:
        runner.reset_started(np.ones(coll.n, bool), coll.bufs["env_ids"][coll.lo:coll.hi])


class _Worker:
    """One worker's state: its envs, collectors, copy of the agent and mirrored params."""

    def __init__(self, link: Link, arrays: dict, cfg: WorkerConfig):
        self.link, self.cfg, self.arrays = link, cfg, arrays
        self.sets = [arrays[key] for key in ("main", "main1") if key in arrays]
        self.bufs, self.ctrl = self.sets[0], arrays["ctrl"]
        lo, hi = cfg.envs
        num = self.num = cfg.numbering
        self.where = f"worker {cfg.index}" + (f" of rank {cfg.rank}" * (cfg.world_size > 1))
        _limit_threads(cfg.torch_threads)
        if cfg.cpu_affinity is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cfg.cpu_affinity)
        # This worker's random streams: global ones (for env_fn and envs that use them)
        # and, once env_fn may have imported torch, torch's and the agent's own generators.
        seeds = worker_seed(cfg.seed, num.first + lo, cfg.restart)
        reseed(None, seeds)
        width = cfg.form[1]
        for v in range(lo // width, hi // width):  # one by one: a SIGTERM meanwhile closes
            mark(link.beat, MAKE, 0, v * width - lo)  # those built so far
            link.envs.append(make_env(cfg.env_fn, env_label(v, cfg.form, first=num.first)))
        reseed(cfg.agent, seeds)
        self.runner = AgentRunner(cfg.agent) if cfg.agent is not None else None
        for bufs in self.sets:
            bufs["env_ids"] = num.env_ids()
        self.coll = collector(list(link.envs), lo, self.bufs, *cfg.form, batch_T=cfg.batch_T,
                              wait=cfg.wait, traj_info=cfg.traj_info, where=self.where,
                              spare=self.sets[1] if len(self.sets) > 1 else None,
                              first=num.first)
        self.coll.beat = link.beat
        self.coll.restart_count = cfg.restart
        self.coll.use(cfg.start_set)  # a replacement writes where the next batch looks
        self.coll.carry_from(cfg.start_set)
        if self.runner is not None:
            self.runner.call("reset")
        self.coll.reset_all(cfg.seed, cfg.max_decorrelation_steps)
        _limit_threads(cfg.torch_threads)  # env_fn may have imported torch
        self.params = arrays.get("params")
        self.mirror = _mirror(self.runner, self.params)
        self.ecoll, self.first_eval = None, True

    def collect(self, itr: int, buf: int) -> list:
        runner, bufs, beat = self.runner, self.sets[buf], self.link.beat
        self._enter_mode("sample_mode", itr)
        self.coll.use(buf)
        done = run_batch(self.coll, runner, self.link, bufs)
        if runner is not None and "bootstrap_value" in bufs:
            lo, hi = self.cfg.envs
            T = self.coll.T
            mark(beat, AGENT, T)
            v = runner.value(_rows(bufs["observation_full"], T, lo, hi),
                             bufs["prev_action_full"][T, lo:hi],
                             bufs["prev_reward_full"][T, lo:hi], bufs["env_ids"][lo:hi])
            write_checked(bufs["bootstrap_value"][lo:hi], v,
                          f"bootstrap value for envs {self.num.first + lo}.."
                          f"{self.num.first + hi - 1} ({self.where})",
                          "agent.value returned")
        mark(beat, IDLE)
        return done

    def evaluate(self, itr: int, max_steps: int) -> list:
        cfg, ebufs = self.cfg, self.arrays.get("eval")
        if self.ecoll is None:
            (elo, ehi), width = cfg.eval_envs, cfg.eval_form[1]
            built = []
            for e in range(elo // width, ehi // width):
                mark(self.link.beat, EVAL_MAKE, 0, e * width - elo)
                built.append(make_env(cfg.eval_env_fn, env_label(
                    e, cfg.eval_form, "eval env", self.num.eval_first), "eval_env_fn"))
                self.link.envs.append(built[-1])
            ebufs["env_ids"] = self.num.eval_ids()
            self.ecoll = collector(built, elo, ebufs, *cfg.eval_form, batch_T=1, wait=False,
                                   traj_info=cfg.traj_info, where=self.where, label="eval env",
                                   first=self.num.eval_first, seed_base=self.num.eval_base)
            self.ecoll.beat = self.link.beat
            self.ecoll.restart_count = cfg.restart
        self._enter_mode("eval_mode", itr)
        restart_eval(self.ecoll, self.runner, cfg.seed, self.first_eval)
        self.first_eval = False
        results = run_eval(self.ecoll, self.runner, self.link, ebufs, max_steps, 0, self.ctrl)
        mark(self.link.beat, IDLE)
        return results

    def _enter_mode(self, mode: str, itr: int) -> None:
        if self.runner is not None:
            if self.mirror is not None:
                load_params(self.mirror.arrays(), self.params)
            self.runner.call(mode, itr)


def run(link: Link, arrays: dict, cfg: WorkerConfig) -> None:
    """The worker program: build the envs, say Ready, then serve commands until Close."""
    worker = _Worker(link, arrays, cfg)
    # Everything built so far lives as long as the worker: keep the cyclic collector
    # from walking it again and again (a full collection mid-batch stalls every worker).
    gc.freeze()
    mark(link.beat, IDLE)
    link.send(Ready())
    while True:
        cmd = link.recv()
        if isinstance(cmd, Collect):
            link.send(Done(worker.collect(cmd.itr, cmd.buf)))
        elif isinstance(cmd, Evaluate):
            link.send(Done(worker.evaluate(cmd.itr, cmd.max_steps)))
        elif isinstance(cmd, Close):
            return
        else:
            raise TypeError(f"unknown command {cmd!r} (a bug in the sampler)")


def _rows(tree, t, lo, hi):
    return tree_map(lambda a: a[t, lo:hi], tree) if is_tree(tree) else tree[t, lo:hi]


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
