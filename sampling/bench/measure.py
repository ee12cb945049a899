"""The benchmark's measurements: every kind, the env alone and W envs alone, in rounds.

Imports the public core (make_sampler, AgentRunner, the kinds, auto's probes) and the
report's verdict. The reference processes that step the env alone (``_ParallelEnvAlone``)
run on the core's worker pool. Non-goal: profiling inside worker processes; time spent there
is estimated from what the parent can measure, and labelled as an estimate.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..agents import AgentRunner
from ..api import make_sampler
from ..auto import agent_call_s, per_worker
from ..errors import WorkerError, close_all
from ..kinds import KINDS, usable_cpus, worker_count
from ..pool import Close, Done, Link, Pool, PoolSpec, Ready, start_method_of
from ..spaces import Box, Discrete, action_pool
from ..vector import is_vector, random_stepper, vector_width
from .inputs import BenchError, check_env, env_width
from .report import ALL_KINDS, ROUNDS, pick_kind, recommendation, spread

__all__ = ["benchmark", "env_alone", "handoff_us", "DEFAULT_SECONDS"]

DEFAULT_SECONDS = 3.0  # timed seconds per kind and per reference: a full run about half a minute
AGENT_TIMING_S = 0.3   # timing the agent alone in this process, split over the batch sizes
ENV_ACTIONS = 4096     # random actions drawn before the env alone is timed (drawing is not
#                        timed), then cycled
CLOCK_EVERY = 64       # env steps between two looks at the clock: its cost stays negligible
WARMUP_S = 0.02        # an untimed chunk first: lazy initialisation, cold caches
PROFILE_SHARE = 2      # serial with env.step timed gets 1/this of a chunk: only its shares count
# The handoff: a no-op env and agent, one env per worker, batches this long (per-batch costs
# spread thin), timed for seconds / HANDOFF_SHARE, within these bounds, in HANDOFF_ROUNDS chunks.
HANDOFF_T = 64
HANDOFF_SHARE = 5
HANDOFF_MIN_S, HANDOFF_MAX_S = 0.15, 0.6
HANDOFF_ROUNDS = 3



# -- chunk runners: run_chunk(s) works >= s seconds and returns (units, seconds) -----------
def _median_rate(run_chunk: Callable[[float], tuple], seconds: float,
                 n_chunks: int = ROUNDS) -> float:
    """Median of ``n_chunks`` rates; ``run_chunk(s)`` works >= s seconds, returns (units, dt)."""
    rates = []
    for _ in range(n_chunks):
        units, dt = run_chunk(seconds / n_chunks)
        rates.append(units / dt)
    return statistics.median(rates)


def _env_chunks(env: Any, seed: int) -> Callable[[float], tuple]:
    """A chunk runner stepping ``env`` alone with random actions (reset when done); its
    units are env steps (``num_envs`` per step of a vector env)."""
    if is_vector(env):
        return _vector_env_chunks(env, seed)
    env.reset(seed=seed)
    pool = action_pool(env.action_space, ENV_ACTIONS, seed)
    state = {"i": 0}

    def chunk(target: float) -> tuple:
        step, reset, n_pool = env.step, env.reset, len(pool)
        i, n = state["i"], 0
        t0 = time.perf_counter()
        while True:
            for _ in range(CLOCK_EVERY):
                _, _, te, tr, _ = step(pool[i])
                i = i + 1 if i + 1 < n_pool else 0
                if te or tr:
                    reset()
            n += CLOCK_EVERY
            dt = time.perf_counter() - t0
            if dt >= target:
                state["i"] = i
                return n, dt

    chunk(WARMUP_S)
    return chunk


def _vector_env_chunks(env: Any, seed: int) -> Callable[[float], tuple]:
    width = vector_width(env)
    step = random_stepper(env, seed, max(1, ENV_ACTIONS // width))

    def chunk(target: float) -> tuple:
        n, t0 = 0, time.perf_counter()
        while True:
            for _ in range(CLOCK_EVERY):
                step()
            n += CLOCK_EVERY * width
            dt = time.perf_counter() - t0
            if dt >= target:
                return n, dt

    chunk(WARMUP_S)
    return chunk


def _reference(make: Callable, env: Any, seed: int) -> Callable[[float], tuple]:
    """``make(env, seed)``'s chunk runner of the env alone, whose failures (there, or in any
    later chunk) are a BenchError that says so: no sampler ran it."""
    def failed(e: Exception) -> BenchError:
        return BenchError(f"the env raised {type(e).__name__}: {e} while stepping alone in "
                          f"this process (the benchmark's reference, random actions), before "
                          f"any sampler ran it")
    try:
        chunk = make(env, seed)
    except Exception as e:
        raise failed(e) from e

    def run(target: float) -> tuple:
        try:
            return chunk(target)
        except Exception as e:
            raise failed(e) from e
    return run


def _sampler_chunks(s: Any) -> Callable[[float], tuple]:
    """A chunk runner collecting whole batches from sampler ``s``; returns (env steps, dt)."""
    itr = [1]
    per_batch = s.batch_T * s.batch_B

    def chunk(target: float) -> tuple:
        n, t0 = 0, time.perf_counter()
        while True:
            s.obtain_samples(itr[0])
            itr[0] += 1
            n += 1
            dt = time.perf_counter() - t0
            if dt >= target:
                return n * per_batch, dt

    return chunk


def env_alone(env_fn: Callable[[], Any], seconds: float = DEFAULT_SECONDS,
              seed: int = 0) -> float:
    """Steps per second of one env stepping random actions in this process (reset when done).

    The reference for every kind: ``n`` workers can at best step ``n`` times this.
    """
    env = env_fn()
    try:
        return _median_rate(_reference(_env_chunks, env, seed), seconds)
    finally:
        close_all([env])


# -- W envs alone, in W processes ------------------------------------------------------------
@dataclass(frozen=True)
class _Chunk:
    """P -> reference process: step the env for ``seconds``; reply Done((steps, seconds))."""

    seconds: float


def _env_alone_program(link: Link, arrays: dict, config: tuple) -> None:
    """A reference process (run by the core's worker pool): one env, stepped on request."""
    env_fn, seed = config
    env = env_fn()
    link.envs.append(env)  # the pool closes it, whatever way the process ends
    chunk = _env_chunks(env, seed)
    link.send(Ready())
    while True:
        cmd = link.recv()
        if isinstance(cmd, Close):
            return
        link.send(Done(chunk(cmd.seconds)))


class _ParallelEnvAlone:
    """``n`` processes, each stepping one env alone, timed together: what this machine
    gives ``n`` workers at best right now (cores, SMT, other load), with no sampler. They
    run on the core's :class:`~sampling.pool.Pool`: errors, deaths, Ctrl-C and close as
    for a sampler's workers."""

    def __init__(self, env_fn: Callable, n: int, start_method: str | None):
        self.pool = Pool()
        self.slowest: list = []  # per chunk, the rate of the slowest process
        try:
            with _as_bench_error():
                self.pool.start(PoolSpec(
                    program=_env_alone_program, configs=[(env_fn, i) for i in range(n)],
                    shared=None, placed={}, start_method=start_method,
                    labels=[f"reference process {i} (the env alone)" for i in range(n)],
                    envs=[[i] for i in range(n)], name="sampling-bench-env"))
        except BaseException:
            self.close()
            raise

    def chunk(self, target: float) -> tuple:
        """Run all processes for ``target`` seconds; returns (their summed rate, 1.0)."""
        with _as_bench_error():
            self.pool.send(_Chunk(target))
            rates = [n / dt for n, dt in self.pool.gather(range(self.pool.size)).values()]
        self.slowest.append(min(rates))
        return sum(rates), 1.0

    def close(self) -> None:
        self.pool.stop(graceful=True)


@contextmanager
def _as_bench_error():
    """A reference process's failure as the benchmark reports it."""
    try:
        yield
    except WorkerError as e:
        cause = e.__cause__
        what = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
        raise BenchError(f"a process stepping the env alone failed: {what}") from e


# -- timing proxies and the handoff ----------------------------------------------------------
class _TimedAgent:
    """An rlpyt-style agent proxy that adds up the seconds spent in ``step``."""

    def __init__(self, agent: Any):
        self._agent = agent
        self._runner = AgentRunner(agent)  # passes env_ids on if the agent takes them
        self.seconds = 0.0

    def step(self, observation, prev_action, prev_reward, env_ids=None):
        t0 = time.perf_counter()
        out = self._runner.step(observation, prev_action, prev_reward, env_ids)
        self.seconds += time.perf_counter() - t0
        return out

    def __getattr__(self, name: str) -> Any:  # reset, reset_one, value, sample_mode, ...
        return getattr(self.__dict__["_agent"], name)


class _TimedPolicy:
    """A plain-callable policy proxy that adds up the seconds spent in calls."""

    def __init__(self, policy: Callable):
        self._policy = policy
        self.seconds = 0.0

    def __call__(self, observation):
        t0 = time.perf_counter()
        out = self._policy(observation)
        self.seconds += time.perf_counter() - t0
        return out


def _timed(agent: Any) -> Any:
    return _TimedAgent(agent) if callable(getattr(agent, "step", None)) else _TimedPolicy(agent)


class _TimedEnv:
    """An env proxy that adds the seconds spent in ``step`` to a shared total."""

    def __init__(self, env: Any, total: list):
        self._env, self._total = env, total

    def step(self, action):
        t0 = time.perf_counter()
        out = self._env.step(action)
        self._total[0] += time.perf_counter() - t0
        return out

    def __getattr__(self, name: str) -> Any:  # reset, close, spaces, ...
        return getattr(self.__dict__["_env"], name)


class _NoopEnv:
    """Costs (almost) nothing per step and never ends: isolates the sampler's own cost."""

    def __init__(self):
        self.observation_space = Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self.action_space = Discrete(2)
        self._obs = np.zeros(4, np.float32)

    def reset(self, *, seed=None, options=None):
        return self._obs, {}

    def step(self, action):
        return self._obs, 0.0, False, False, {}

    def close(self):
        pass


class _ZeroPolicy:
    def __call__(self, observation):
        return np.zeros(len(observation), np.int64)


def handoff_us(kind: str, n_workers: int, *, seconds: float = 0.5,
               start_method: str | None = None) -> float:
    """Microseconds per batch step of ``kind`` with a no-op env and agent, one env per
    worker: the action server's observation -> action round trip, sampler bookkeeping
    included."""
    W = _whole_groups(kind, n_workers)
    with make_sampler(kind, _NoopEnv, _ZeroPolicy(), batch_T=HANDOFF_T, batch_B=W,
                      n_workers=W, start_method=start_method) as s:
        s.obtain_samples(0)
        steps_per_s = _median_rate(_sampler_chunks(s), seconds, n_chunks=HANDOFF_ROUNDS)
    return 1e6 * W / steps_per_s


# -- the run ---------------------------------------------------------------------------------
def _busy_cpu_s() -> float | None:
    """CPU-seconds all processes spent busy since boot (Linux ``/proc/stat``), else None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _own_cpu_s() -> float:
    """CPU-seconds of this process and its finished children (the workers, once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _LoadMeter:
    """The average CPUs other processes kept busy from its creation to :meth:`other_cpus`."""

    def __init__(self):
        self.busy0, self.own0, self.t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()

    def other_cpus(self) -> float | None:
        busy1, own1 = _busy_cpu_s(), _own_cpu_s()
        if self.busy0 is None or busy1 is None:
            return None
        return max(0.0, (busy1 - self.busy0) - (own1 - self.own0)) / (time.perf_counter()
                                                                     - self.t0)


def _breakdown(r: dict, env_step_s: float, agent_est_s: dict, batch_B: int,
               serial_prof: dict | None, width: int = 1) -> dict:
    """Fractions of wall time per batch step: envs, agent, the rest (see format_report)."""
    k = KINDS[r["kind"]]
    W = r["workers"]
    wall_step = batch_B / r["steps_per_s"]
    if not k.workers and serial_prof is not None:  # measured around each call
        env_f, env_est = serial_prof["env_s"] / serial_prof["elapsed_s"], False
        agent_f, agent_est = serial_prof["agent_s"] / serial_prof["elapsed_s"], False
    else:
        # The envs on the critical path: all (serial), or one worker's (rounded up).
        envs_on_path = batch_B if not k.workers else per_worker(batch_B, W, width)
        env_f, env_est = envs_on_path * env_step_s / wall_step, True
        if r["agent_s"] is not None:
            agent_f, agent_est = r["agent_s"] / r["elapsed_s"], False
        else:
            agent_f, agent_est = agent_est_s[per_worker(batch_B, W, width)] / wall_step, True
    other = 1.0 - env_f - agent_f
    return {"env": env_f, "agent": agent_f, "other": max(0.0, other),
            "overlapped": other < 0 and k.overlap,
            "env_estimated": env_est, "agent_estimated": agent_est,
            "overhead_us_per_step": max(0.0, other) * wall_step * 1e6}


def _worker_counts(kinds: Sequence[str], batch_B: int, W: int, width: int) -> dict:
    """``{kind: its worker count}``, or the reason it cannot split ``batch_B`` (a str)."""
    out: dict = {}
    for kind in kinds:
        try:
            with warnings.catch_warnings():  # more workers than envs: the kind uses fewer
                warnings.simplefilter("ignore")
                out[kind] = worker_count(kind, batch_B, _whole_groups(kind, W), width=width)
        except ValueError as e:
            out[kind] = str(e)
    return out


def _whole_groups(kind: str, n: int) -> int:
    """``n`` workers rounded down to whole groups of ``kind`` (at least one per group)."""
    groups = KINDS[kind].groups
    return max(groups, n - n % groups)


def _start_references(stack: ExitStack, env_fn: Callable, W: int, start_method: str | None,
                      progress: Callable) -> tuple:
    """Chunk runners of the env alone (key None) and, with W > 1, of W envs alone in W
    processes (key "parallel", and those processes)."""
    env = env_fn()
    stack.callback(env.close)
    chunks: dict = {None: _reference(_env_chunks, env, 0)}
    par = None
    if W > 1:
        progress(f"starting {W} processes that step the env alone...")
        par = _ParallelEnvAlone(env_fn, W, start_method)
        stack.callback(par.close)
        chunks["parallel"] = par.chunk
    return chunks, par


def _start_kinds(stack: ExitStack, chunks: dict, env_fn: Callable, agent: Any,
                 workers: dict, batch_T: int, batch_B: int, start_method: str | None,
                 progress: Callable) -> tuple:
    """Start (and warm up) a sampler of each kind; add its chunk runner to ``chunks``.
    Returns (``{kind: result so far}``, ``{kind: timing proxy of the parent's agent}``)."""
    results: dict = {}
    timed: dict = {}
    for kind, w in workers.items():
        if isinstance(w, str):  # e.g. batch_B not splittable in two groups
            results[kind] = {"kind": kind, "workers": 0, "skipped": w}
            continue
        progress(f"starting {kind}" + (f" ({w} workers)" if w else "") + "...")
        k = KINDS[kind]
        if not k.workers or k.served:  # the parent runs the agent: time it there
            timed[kind] = _timed(agent)
        try:
            s = stack.enter_context(make_sampler(
                kind, env_fn, timed.get(kind, agent), batch_T=batch_T, batch_B=batch_B,
                n_workers=w or None, start_method=start_method))
        except (ValueError, TypeError) as e:
            results[kind] = {"kind": kind, "workers": w, "skipped": str(e)}
            continue
        s.obtain_samples(0)  # warm-up
        chunks[kind] = _sampler_chunks(s)
        results[kind] = {"kind": kind, "workers": s.n_workers}
        if kind in timed:
            timed[kind].seconds = 0.0
    return results, timed


class _SerialProfile:
    """A second serial sampler with timing proxies around env.step and the agent: where
    serial's time goes, measured in the same rounds (its own rate, a little lower because
    of the proxies, is not reported)."""

    def __init__(self, stack: ExitStack, env_fn: Callable, agent: Any, batch_T: int,
                 batch_B: int):
        self.env_total = [0.0]
        self.agent = _timed(agent)
        total = self.env_total
        s = stack.enter_context(make_sampler(
            "serial", lambda: _TimedEnv(env_fn(), total), self.agent,
            batch_T=batch_T, batch_B=batch_B))
        s.obtain_samples(0)
        self.env_total[0] = self.agent.seconds = 0.0
        self.chunk = _sampler_chunks(s)

    def summary(self, elapsed_s: float, steps: int) -> dict:
        return {"env_s": self.env_total[0], "agent_s": self.agent.seconds,
                "elapsed_s": elapsed_s, "env_step_s": self.env_total[0] / steps}


def _rounds(chunks: dict, seconds: float, W: int, progress: Callable) -> tuple:
    """``ROUNDS`` rounds, each one chunk per runner in a rotating order, so that load from
    other processes hits every figure alike. Returns ``{name: rates}``, ``{name: units}``,
    ``{name: seconds}``."""
    rates: dict = {name: [] for name in chunks}
    steps = dict.fromkeys(chunks, 0)
    elapsed = dict.fromkeys(chunks, 0.0)
    order = list(chunks)
    label = {None: "the env alone", "parallel": f"{W} envs alone",
             "profile": "serial with env.step timed"}
    for rnd in range(ROUNDS):
        names = order[rnd % len(order):] + order[:rnd % len(order)]
        progress(f"round {rnd + 1}/{ROUNDS}: measuring "
                 + ", ".join(label.get(n, n) for n in names) + "...")
        for name in names:
            share = PROFILE_SHARE if name == "profile" else 1
            units, dt = chunks[name](seconds / ROUNDS / share)
            rates[name].append(units / dt)
            elapsed[name] += dt
            steps[name] += units
    return rates, steps, elapsed


def benchmark(env_fn: Callable, agent: Any, *, batch_T: int = 128, batch_B: int = 16,
              n_workers: int | None = None, kinds: Sequence[str] = ALL_KINDS,
              seconds: float = DEFAULT_SECONDS, start_method: str | None = None,
              progress: Callable[[str], None] = lambda msg: None,
              spaces: tuple | None = None, width: int | None = None) -> dict:
    """Measure the env alone and each of ``kinds`` for ``seconds`` each; return a report.

    All samplers are started (and warmed up with one batch) first; then ``ROUNDS``
    rounds each time one chunk of whole batches per kind and one of the env alone, in a
    rotating order, so that load from other processes hits every figure alike. A rate is
    the median over the rounds. With a vector env (``width`` = its num_envs, found by
    building one if not given) rates count env steps, and the unit is the vector env alone.
    """
    cpus = usable_cpus()
    load = _LoadMeter()
    if spaces is None:
        spaces = check_env(env_fn, getattr(env_fn, "__name__", repr(env_fn)))
    if width is None:  # env steps per env.step(): num_envs of a vector env
        width = env_width(env_fn, getattr(env_fn, "__name__", repr(env_fn)))
    W = n_workers if n_workers is not None else min(batch_B // width, cpus)
    workers = _worker_counts(kinds, batch_B, W, width)
    sizes = {batch_B} | {per_worker(batch_B, w, width) for w in workers.values()
                         if w and isinstance(w, int)}
    progress("timing the agent...")
    twin = _twin(agent)
    agent_s = agent_call_s(twin, *spaces, sizes, AGENT_TIMING_S)
    profile = None
    with ExitStack() as stack:
        chunks, par = _start_references(stack, env_fn, W, start_method, progress)
        results, timed = _start_kinds(stack, chunks, env_fn, agent, workers, batch_T, batch_B,
                                      start_method, progress)
        if "serial" in kinds:
            progress("starting serial with env.step timed...")
            profile = _SerialProfile(stack, env_fn, twin, batch_T, batch_B)
            chunks["profile"] = profile.chunk
        rates, steps, elapsed = _rounds(chunks, seconds, W, progress)
    serial_prof = profile.summary(elapsed["profile"], steps["profile"]) if profile else None
    alone = statistics.median(rates[None])
    par_alone = statistics.median(rates["parallel"]) if par else alone
    # Cores of a VM can run at different speeds at once (another tenant on one of them): a
    # kind that waits for every worker each batch gets at most W x the slowest process.
    par_slowest = statistics.median(par.slowest) if par else alone
    refs = {"alone": alone, "par_alone": par_alone, "W": W, "cpus": cpus, "batch_B": batch_B,
            "agent_s": agent_s, "serial_prof": serial_prof, "width": width}
    for kind, r in results.items():
        if "skipped" not in r:
            _summarize(r, rates[kind], elapsed[kind], timed.get(kind), refs)
            if KINDS[kind].served:
                progress(f"measuring the {kind} handoff (no-op env and agent)...")
                r["handoff_us"] = handoff_us(
                    kind, W, seconds=min(HANDOFF_MAX_S, max(HANDOFF_MIN_S,
                                                            seconds / HANDOFF_SHARE)),
                    start_method=start_method)
    return {"batch_T": batch_T, "batch_B": batch_B, "workers": W, "usable_cpus": cpus,
            "env_num_envs": width,
            "start_method": start_method_of(start_method),
            "seconds_per_kind": seconds, "other_load_cpus": load.other_cpus(),
            "env_alone_steps_per_s": alone, "parallel_env_alone_steps_per_s": par_alone,
            "parallel_env_alone_slowest_steps_per_s": par_slowest,
            "env_step_us_in_serial": serial_prof["env_step_s"] * 1e6 if serial_prof else None,
            "agent_us_per_call": {str(n): s * 1e6 for n, s in sorted(agent_s.items())},
            **_verdict(results, rates)}


def _twin(agent: Any) -> Any:
    """A copy of ``agent`` to time and profile: its own state (e.g. its random stream)
    stays untouched. The agent itself where it cannot be copied."""
    try:
        return copy.deepcopy(agent)
    except Exception:
        return agent


def _summarize(r: dict, rates: list, elapsed_s: float, timed: Any, refs: dict) -> None:
    """Add a kind's figures to its result ``r``: rate, spread, ratios, breakdown."""
    r["steps_per_s"] = statistics.median(rates)
    r["steps_per_s_rounds"] = rates
    r["steps_per_s_iqr"] = list(spread(rates))
    r["elapsed_s"] = elapsed_s
    r["agent_s"] = timed.seconds if timed is not None else None
    alone = refs["alone"]
    ideal_x = 1 if not r["workers"] else min(r["workers"], refs["cpus"])
    r["ratio_to_env_alone"] = r["steps_per_s"] / alone
    r["share_of_ideal"] = r["steps_per_s"] / (alone * ideal_x)
    if r["workers"] in (0, refs["W"]):
        r["share_of_parallel_env_alone"] = r["steps_per_s"] / (refs["par_alone"] if r["workers"]
                                                               else alone)
    r["breakdown"] = _breakdown(r, 1.0 / alone, refs["agent_s"], refs["batch_B"],
                                refs["serial_prof"], refs["width"])


def _verdict(results: dict, rates: dict) -> dict:
    """The report's results and its pick: best, fastest, tied_with, recommendation."""
    ok = {kind: r for kind, r in results.items() if "skipped" not in r}
    pick = pick_kind({kind: rates[kind] for kind in ok}) if ok else None
    return {"results": list(results.values()),
            "best": pick["best"] if pick else None,
            "fastest": pick["fastest"] if pick else None,
            "tied_with": pick["tied_with"] if pick else [],
            "recommendation": recommendation(ok[pick["best"]], pick) if pick
            else "no kind could run"}
