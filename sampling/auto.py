"""``make_sampler("auto", ...)``: a short probe of the env and the agent, and a pure cost model.

Imports agents, agent_state, kinds, pool, probe, tree and vector; never api (which
calls in here) nor the benchmark subpackage (which reuses the probes). :func:`predict` and
:func:`pick` are pure: they can be read and tested on figures made up by hand. Non-goal:
timing inside worker processes.
"""
from __future__ import annotations

import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .agent_state import device_of
from .agents import AgentRunner
from .kinds import KINDS, usable_cpus, worker_count
from .pool import start_method_of, unpicklable
from .probe import Probed, probe
from .tree import tree_map
from .vector import Form, random_stepper

__all__ = ["Measurements", "choose_kind", "measure", "predict", "pick", "explain",
           "serial_only", "worker_counts", "ruled_out", "time_env", "agent_call_s",
           "cpu_can_ship", "HANDOFF_S", "COLLECT_S",
           "PROBE_ENV_S", "PROBE_AGENT_S", "PREFER_SIMPLER"]

log = logging.getLogger(__name__)

# The model's constants, measured on a 2-core VM.
HANDOFF_S = 30e-6    # one observation -> action round trip through the action server
COLLECT_S = 2e-6     # the sampler's own bookkeeping per env step (any process)
# A kind further down KINDS (more processes, more handoffs, harder to debug) is picked only
# when predicted this many times faster than the simpler one: the constants above come from
# one machine and the probe lasts about a second, so a smaller predicted gain is noise.
PREFER_SIMPLER = 1.1

PROBE_ENV_S = 0.4    # probe budget: stepping the env
PROBE_AGENT_S = 0.3  # probe budget: calling the agent (split over the batch sizes timed)
PROBE_ACTIONS = 256  # random actions drawn before timing (drawing is not timed), then cycled
PROBE_BLOCK_S = 20e-6  # steps are timed in blocks of about this long: the clock's own cost
#                        (well under 1 us) stays a small part of each timing
PROBE_MAX_BLOCK = 64   # ... but at most this many steps, so a fast env still gives many blocks
PROBE_MAX_STEPS = 50_000  # a fast env has a steady median long before the budget: stop here
PROBE_MAX_CALLS = 500  # agent calls per batch size, likewise
PROBE_MIN_CALLS = 2    # agent calls per batch size even past the budget (a slow agent)

RULED_OUT_ALTERNATING = "needs an even worker count and two equal env groups"
RULED_OUT_ON_GPU = "the agent is on a GPU"
RULED_OUT_UNPICKLABLE = "the agent cannot be pickled for spawn/forkserver workers"
RULED_OUT_ENV_PROCESSES = ("the env starts processes of its own (e.g. AsyncVectorEnv), "
                           "which a worker cannot")


@dataclass(frozen=True)
class Measurements:
    """What the probe found, and the setup the cost model predicts for."""

    env_step_s: float        # seconds per env step (random actions), bookkeeping excluded
    agent_call_s: dict       # {n: seconds per agent call on n envs}, for every n the model uses
    batch_B: int             # B: envs per batch
    n_workers: int           # W: workers of cpu and gpu
    alternating_workers: int | None  # workers of alternating; None where it cannot split B
    usable_cpus: int         # C
    ruled_out: dict = field(default_factory=dict)  # {kind: why it cannot run}
    width: int = 1           # n: envs per env object (num_envs of a vector env, else 1)


# -- the cost model (pure) -----------------------------------------------------------------
def predict(m: Measurements) -> dict:
    """Predicted wall seconds per batch step of each kind that can run: {kind: seconds}.

    With e = ``env_step_s + COLLECT_S / width`` (the bookkeeping is per env object: one
    vector env call records ``width`` env steps), a(n) = ``agent_call_s[n]``,
    h = ``HANDOFF_S``,
    each kind's time is ``max(critical path, CPU work / C)``:

    ===========  ===============================  =========================
    kind         critical path                    CPU work
    ===========  ===============================  =========================
    serial       B e + a(B)                       same
    cpu          (B/W) e + a(B/W)                 B e + W a(B/W)
    gpu          (B/W) e + a(B) + h               B e + a(B) + h
    alternating  max(2 a(B/2), (B/W) e + a(B/2))  B e + 2 a(B/2) + 2 h
                 + h
    ===========  ===============================  =========================

    (B/W rounded up to whole vector envs; alternating with its own W.)
    no_overlap_alternating, there for rlpyt parity, is never faster than gpu and is not
    modelled.
    """
    B, W, C, a, h = m.batch_B, m.n_workers, m.usable_cpus, m.agent_call_s, HANDOFF_S
    e = m.env_step_s + COLLECT_S / m.width
    per_w = per_worker(B, W, m.width)
    pred = {"serial": B * e + a[B]}
    if "cpu" not in m.ruled_out:
        pred["cpu"] = max(per_w * e + a[per_w], (B * e + W * a[per_w]) / C)
    if "gpu" not in m.ruled_out:
        pred["gpu"] = max(per_w * e + a[B] + h, (B * e + a[B] + h) / C)
    if m.alternating_workers is not None and "alternating" not in m.ruled_out:
        pw, ah = per_worker(B, m.alternating_workers, m.width), a[B // 2]
        pred["alternating"] = max(max(2 * ah, pw * e + ah) + h, (B * e + 2 * ah + 2 * h) / C)
    return pred


def pick(predicted: dict) -> str:
    """The kind to run: going down :data:`~sampling.KINDS` (simplest first), a kind replaces
    the pick so far only if predicted ``PREFER_SIMPLER`` times faster."""
    order = [k for k in KINDS if k in predicted]
    kind = order[0]
    for k in order[1:]:
        if predicted[k] < predicted[kind] / PREFER_SIMPLER:
            kind = k
    return kind


def serial_only(batch_B: int, n_workers: int, cpus: int) -> str | None:
    """Why no kind can beat serial with ``cpus`` usable CPUs, before measuring; or None."""
    why = ("1 usable CPU" if cpus == 1 else "batch_B=1" if batch_B == 1
           else "n_workers=1" if n_workers == 1 else None)
    return f"{why}: worker processes cannot run in parallel" if why else None


def ruled_out(*, alternating_workers: int | None, agent_on_gpu: bool,
              agent_ships: bool, env_processes: bool = False) -> dict:
    """``{kind: why}`` for the kinds that cannot run this agent on this batch (or this
    env: one that starts processes of its own cannot run in a daemonic worker)."""
    if env_processes:
        return {k: RULED_OUT_ENV_PROCESSES for k, v in KINDS.items() if v.workers}
    out = {}
    if alternating_workers is None:
        out["alternating"] = RULED_OUT_ALTERNATING
    if agent_on_gpu:
        out["cpu"] = RULED_OUT_ON_GPU
    elif not agent_ships:
        out["cpu"] = RULED_OUT_UNPICKLABLE
    return out


def explain(kind: str, m: Measurements, predicted: dict, probe_s: float) -> str:
    """The reason ``auto`` gives for ``kind`` (``sampler.auto_reason``)."""
    B, W, a = m.batch_B, m.n_workers, m.agent_call_s
    e = m.env_step_s + COLLECT_S / m.width
    per_w = per_worker(B, W, m.width)
    speedup = predicted["serial"] / predicted[kind]
    why = (f"env {e * 1e6:.3g} us/step, agent {a[B] * 1e6:.3g} us on {B} envs"
           + (f" / {a[per_w] * 1e6:.3g} us on {per_w}" if per_w != B else "")
           + f"; model: {speedup:.2f}x serial with {W} workers on {m.usable_cpus} idle CPUs")
    served_faster = "cpu" in predicted and predicted[kind] < predicted["cpu"]
    if kind == "cpu" and B * e >= W * a[per_w]:
        lead = "envs dominate and the agent is cheap: each worker runs its own copy"
    elif kind == "cpu":
        lead = ("the agent costs more than the envs but runs on the CPU: W copies in "
                "parallel beat one call in the parent")
    elif KINDS[kind].served and "cpu" in m.ruled_out:
        lead = f"cpu is ruled out ({m.ruled_out['cpu']}): this process runs the agent"
    elif KINDS[kind].served and served_faster:
        lead = "the agent is expensive next to one worker's envs: one batched call in the parent"
    elif KINDS[kind].served:
        lead = "one batched call of the agent in the parent"
    else:
        lead = "parallel kinds are not predicted faster"
    reason = f"{lead} ({why}"
    if m.ruled_out:
        reason += "; ruled out: " + ", ".join(f"{k} ({v})" for k, v in m.ruled_out.items())
    return reason + f"; probe {probe_s:.1f} s)"


# -- the probe -----------------------------------------------------------------------------
def choose_kind(env_fn: Callable, agent: Any, opts: Any) -> tuple:
    """Pick a kind for ``make_sampler("auto", ...)``; return (kind, reason, the probe's
    :class:`~sampling.probe.Probed` or None).

    Serial without a probe when nothing can run in parallel (:func:`serial_only`).
    Otherwise :func:`measure` (about 1 s), :func:`predict` and :func:`pick`. So: cpu when
    the envs dominate and the agent is cheap (each worker runs its own copy); gpu or
    alternating when the agent is expensive next to one worker's envs (one batched call in
    the parent beats W small ones), and in particular when it lives on a GPU. With
    policy_lag (collect beside training) or max_restarts (survive failures), serial is
    left out: it can do neither.
    """
    W, _ = worker_counts(opts.batch_B, opts.n_workers)
    needs_workers = ("it cannot collect beside training (policy_lag=1)" if opts.policy_lag
                     else "it cannot restart workers (max_restarts)" if opts.max_restarts
                     else None)
    why = serial_only(opts.batch_B, W, usable_cpus())
    if why and not needs_workers:
        return _picked("serial", why, None)
    t0 = time.perf_counter()
    p = probe(env_fn, AgentRunner(agent), opts.seed, opts.rank * opts.batch_B,
              opts.bootstrap_value, timing=time_env)
    m = measure(p, agent, opts)
    if m.n_workers == 1 and not needs_workers:  # one vector env holds the whole batch
        return _picked("serial", f"batch_B={m.batch_B} is one vector env of {m.width}: "
                                 f"worker processes cannot run in parallel", p)
    predicted = predict(m)
    drop = needs_workers and len(predicted) > 1
    kind = pick({k: v for k, v in predicted.items() if k != "serial"} if drop else predicted)
    reason = explain(kind, m, predicted, time.perf_counter() - t0)
    if drop:
        reason += f"; serial left out: {needs_workers}"
    return _picked(kind, reason, p)


def _picked(kind: str, reason: str, p: Probed | None) -> tuple:
    log.info("auto picked %s: %s", kind, reason)
    return kind, reason, p


def measure(p: Probed, agent: Any, opts: Any) -> Measurements:
    """The cost model's inputs: the probe env's step time (``p.timing``), the agent's call
    times on copies of the probe's first observation, and the worker counts.

    The agent is called on probe observations, as the sampler's own probe does;
    ``make_sampler`` restores the random states around both, so they consume none.
    """
    B, width = opts.batch_B, p.form.width
    W, W_alt = worker_counts(B, opts.n_workers, width)
    on_gpu = device_of(agent) is not None
    ships = on_gpu or cpu_can_ship(agent, opts.start_method)  # on a GPU: no need to pickle
    out = ruled_out(alternating_workers=W_alt, agent_on_gpu=on_gpu, agent_ships=ships,
                    env_processes=p.own_processes)
    sizes = {B, per_worker(B, W, width)} | ({B // 2} if "alternating" not in out else set())
    a = agent_call_s(agent, p.observation_space, p.action_space, sizes, PROBE_AGENT_S,
                     sample_obs=p.observation, first_id=opts.rank * B)
    return Measurements(env_step_s=p.timing, agent_call_s=a, batch_B=B, n_workers=W,
                        alternating_workers=W_alt, usable_cpus=usable_cpus(), ruled_out=out,
                        width=width)


def per_worker(batch_B: int, workers: int, width: int = 1) -> int:
    """Envs (columns) of the busiest of ``workers``: whole vector envs of ``width``."""
    return -(-(batch_B // width) // workers) * width


def worker_counts(batch_B: int, n_workers: int | None, width: int = 1) -> tuple:
    """(workers of cpu and gpu, workers of alternating or None where it cannot split the
    batch), as :func:`~sampling.kinds.worker_count` gives them."""
    with warnings.catch_warnings():  # make_sampler warns about n_workers > batch_B itself
        warnings.simplefilter("ignore")
        try:
            W = worker_count("cpu", batch_B, n_workers, width=width)
        except ValueError:  # batch_B not whole vector envs: the sampler says so
            W = 1
        try:
            return W, worker_count("alternating", batch_B, n_workers, width=width)
        except ValueError:
            return W, None


def cpu_can_ship(agent: Any, start_method: str | None) -> bool:
    """Whether the cpu kind's workers can get a copy of ``agent`` (fork, or it pickles)."""
    return start_method_of(start_method) == "fork" or unpicklable(agent) is None


def time_env(env: Any, form: Form) -> float:
    """Seconds per env step of the probe env (random actions; a vector env's step over its
    ``num_envs``): the median of blocks of steps, within ``PROBE_ENV_S``."""
    step = random_stepper(env, 0, PROBE_ACTIONS)
    t0 = time.perf_counter()
    step()  # the first step can be slow (lazy init)
    first = time.perf_counter() - t0
    block = max(1, min(PROBE_MAX_BLOCK, int(PROBE_BLOCK_S / max(first, 1e-9))))
    times, n = [], 0
    end = time.perf_counter() + PROBE_ENV_S
    while not times or (time.perf_counter() < end and n < PROBE_MAX_STEPS):
        t0 = time.perf_counter()
        for _ in range(block):
            step()
        times.append((time.perf_counter() - t0) / (block * form.width))
        n += block * form.width
    return statistics.median(times)


def agent_call_s(agent: Any, obs_space: Any, act_space: Any, sizes: Iterable[int],
                 budget_s: float, sample_obs: Any = None, first_id: int = 0) -> dict:
    """Seconds per agent call on ``n`` envs, for each ``n`` in ``sizes`` (median of calls).

    Observations are copies of ``sample_obs`` (or of a draw from ``obs_space``).
    """
    runner = AgentRunner(agent)
    if sample_obs is None:
        sample_obs = obs_space.sample()
    act_shape = tuple(getattr(act_space, "shape", None) or ())
    act_dtype = np.dtype(getattr(act_space, "dtype", None) or np.int64)
    sizes = sorted(set(sizes))
    args = {}
    for n in sizes:
        obs = tree_map(lambda x, n=n: np.ascontiguousarray(
            np.broadcast_to(np.asarray(x), (n,) + np.shape(x))), sample_obs)
        args[n] = (obs, np.zeros((n,) + act_shape, act_dtype), np.zeros(n, np.float32),
                   np.arange(first_id, first_id + n))  # this rank's env ids
        runner.step(*args[n])  # warm-up (first torch calls are slow)
    # Round robin over the sizes, so that a burst of load elsewhere hits all of them alike.
    times: dict = {n: [] for n in sizes}
    end = time.perf_counter() + budget_s
    while len(times[sizes[-1]]) < PROBE_MIN_CALLS or (
            time.perf_counter() < end and len(times[sizes[-1]]) < PROBE_MAX_CALLS):
        for n in sizes:
            t0 = time.perf_counter()
            runner.step(*args[n])
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}
