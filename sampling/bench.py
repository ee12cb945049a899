"""Measure every kind on one env and agent (``python -m sampling``), and pick one (``"auto"``).

Imports api, samplers, agents and spaces; torch and gymnasium only when asked for
(``--agent mlp``, a gymnasium env id). Nothing in the package imports this module
except ``make_sampler("auto", ...)``, lazily. Non-goal: profiling inside worker
processes; time spent there is estimated from what the parent can measure, and
labelled as an estimate.
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from contextlib import ExitStack
from typing import Any, Callable, Sequence

import numpy as np

from .agents import AgentRunner, RandomAgent, _accepts_env_ids
from .api import make_sampler
from .kinds import KINDS, usable_cpus, worker_count
from .spaces import Box, Discrete, random_action_fn

__all__ = ["choose_kind", "resolve_env", "make_agent", "MLPAgent", "env_alone", "benchmark",
           "format_report", "BenchError", "ALL_KINDS", "handoff_us", "pick_kind", "spread",
           "PREFERENCE"]

log = logging.getLogger("sampling")

ALL_KINDS = ("serial", "cpu", "gpu", "alternating", "no_overlap_alternating")
ROUNDS = 9  # a rate is the median over this many interleaved timed chunks
# The recommendation's tie-break, simplest first (fewer processes, fewer per-step handoffs,
# easier to debug): the order auto's rule prefers too. When kinds tie with the fastest (see
# pick_kind), the first of them in this order is recommended.
PREFERENCE = ALL_KINDS
# A figure's spread: the quartiles of its per-round rates. With ROUNDS = 9 that is the 3rd and
# 7th of the sorted rounds: a burst of load elsewhere in one or two rounds does not widen it
# (min..max would, and would then call nearly everything a tie).
SPREAD_QUARTILES = 4  # statistics.quantiles(n=4) cuts at the 1st, 2nd and 3rd quartiles

# Constants of the auto rule (measured on a 2-core VM; see choose_kind).
HANDOFF_S = 30e-6    # one observation -> action round trip through the action server
COLLECT_S = 2e-6     # the sampler's own bookkeeping per env step (any process)
PROBE_ENV_S = 0.4    # probe budget: stepping the env
PROBE_AGENT_S = 0.3  # probe budget: calling the agent (split over the batch sizes timed)


class BenchError(Exception):
    """A benchmark input is unusable (bad --env, missing torch, ...); the message says why."""


# -- env and agent from command-line strings -----------------------------------------------
def resolve_env(spec: str, kwargs: dict | None = None) -> Callable[[], Any]:
    """Return a picklable zero-argument env factory for ``spec``.

    ``spec`` is ``"package.module:factory"`` (any callable returning a gymnasium-API env,
    called with ``**kwargs``) or a gymnasium id such as ``"CartPole-v1"`` (made with
    ``gymnasium.make(spec, **kwargs)``; gymnasium's own ``"module:EnvId"`` form works too).
    Raises :class:`BenchError` with the reason when neither works.
    """
    kwargs = dict(kwargs or {})
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise BenchError(f"--env {spec!r}: cannot import module {mod_name!r} ({e}); use "
                             f"package.module:factory with the module on PYTHONPATH, or a "
                             f"gymnasium id such as CartPole-v1") from None
        obj: Any = mod
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            obj = None
        if callable(obj):
            return functools.partial(obj, **kwargs)
        gym = _gymnasium()  # gymnasium's own "module:EnvId": importing registered the id
        if gym is not None and attr in gym.envs.registry:
            return functools.partial(gym.make, spec, **kwargs)
        raise BenchError(f"--env {spec!r}: module {mod_name!r} has no callable {attr!r} "
                         f"(and {attr!r} is not a registered gymnasium id)")
    gym = _gymnasium()
    if gym is None:
        raise BenchError(f"--env {spec!r} looks like a gymnasium id, but gymnasium is not "
                         f"installed (pip install gymnasium); or pass package.module:factory, "
                         f"e.g. sampling.envs:make_cartpole")
    fn = functools.partial(gym.make, spec, **kwargs)
    if spec not in gym.envs.registry:
        import difflib
        close = difflib.get_close_matches(spec, list(gym.envs.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BenchError(f"--env {spec!r}: no such gymnasium env id{hint} (for your own env "
                         f"pass package.module:factory)")
    return fn


def _gymnasium():
    try:
        import gymnasium
    except ImportError:
        return None
    return gymnasium


def check_env(env_fn: Callable[[], Any], name: str) -> Any:
    """Build one env (closed again) and return its action and observation spaces."""
    try:
        env = env_fn()
    except Exception as e:
        raise BenchError(f"--env {name!r}: making the env failed: {type(e).__name__}: {e}") \
            from None
    try:
        for attr in ("reset", "step", "action_space", "observation_space"):
            if not hasattr(env, attr):
                raise BenchError(f"--env {name!r} returned a {type(env).__name__}, which has no "
                                 f"{attr!r}: expected a gymnasium-API env")
        return env.observation_space, env.action_space
    finally:
        try:
            env.close()
        except Exception:
            pass


def _import_torch():
    try:
        import torch
    except ImportError:
        raise BenchError("the mlp agent needs torch, which is not installed: "
                         "pip install torch (or use --agent random)") from None
    return torch


class MLPAgent:
    """A small torch MLP policy (``hidden`` tanh layers), evaluated under ``torch.no_grad``.

    Discrete actions are sampled from the logits; Box actions are the clipped outputs plus
    Gaussian noise. ``shared_arrays()`` exposes the weights, so the ``cpu`` kind copies
    them to its workers before every batch, as in training. Pickles by its state.
    """

    def __init__(self, observation_space: Any, action_space: Any,
                 hidden: Sequence[int] = (64, 64), seed: int = 0):
        torch = _import_torch()
        shape = getattr(observation_space, "shape", None)
        if shape is None:
            raise BenchError(f"the mlp agent needs an array observation space, got "
                             f"{observation_space!r}")
        self.observation_space, self.action_space = observation_space, action_space
        self.hidden, self.seed = tuple(hidden), seed
        self.discrete = hasattr(action_space, "n") and not hasattr(action_space, "nvec")
        if self.discrete:
            n_out = int(action_space.n)
            self._start = int(getattr(action_space, "start", 0))
        elif hasattr(action_space, "low") and getattr(action_space, "shape", None) is not None:
            n_out = int(np.prod(action_space.shape))
            self._low = torch.as_tensor(np.asarray(action_space.low, np.float32)).reshape(-1)
            self._high = torch.as_tensor(np.asarray(action_space.high, np.float32)).reshape(-1)
        else:
            raise BenchError(f"the mlp agent supports Discrete and Box action spaces, got "
                             f"{action_space!r}")
        self._dtype = np.dtype(action_space.dtype)
        self._act_shape = tuple(action_space.shape)
        n_in = int(np.prod(shape))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            layers, width = [], n_in
            for h in self.hidden:
                layers += [torch.nn.Linear(width, h), torch.nn.Tanh()]
                width = h
            layers.append(torch.nn.Linear(width, n_out))
            self.model = torch.nn.Sequential(*layers)
        self.model.requires_grad_(False)
        self._gen = torch.Generator().manual_seed(seed)
        self._torch = torch

    def step(self, observation, prev_action=None, prev_reward=None):
        torch = self._torch
        with torch.no_grad():
            x = torch.as_tensor(observation).reshape(len(observation), -1).float()
            out = self.model(x)
            if self.discrete:
                a = torch.multinomial(torch.softmax(out, -1), 1, generator=self._gen)[:, 0]
                a = a.numpy() + self._start
            else:
                noise = torch.randn(out.shape, generator=self._gen)
                a = torch.clamp(out + 0.1 * noise, self._low, self._high).numpy()
                a = a.reshape((len(a),) + self._act_shape)
        return a.astype(self._dtype, copy=False), None

    def shared_arrays(self) -> dict:
        return {k: v.numpy() for k, v in self.model.state_dict().items()}

    def __getstate__(self):
        return {"spaces": (self.observation_space, self.action_space), "hidden": self.hidden,
                "seed": self.seed, "params": {k: v.clone() for k, v in
                                              self.model.state_dict().items()}}

    def __setstate__(self, state):
        self.__init__(*state["spaces"], hidden=state["hidden"], seed=state["seed"])
        self.model.load_state_dict(state["params"])


def make_agent(name: str, spaces: tuple, seed: int = 0) -> Any:
    """``"random"`` (:class:`~sampling.RandomAgent`) or ``"mlp"`` (:class:`MLPAgent`)."""
    obs_space, act_space = spaces
    if name == "random":
        return RandomAgent(act_space, seed=seed)
    if name == "mlp":
        return MLPAgent(obs_space, act_space, seed=seed)
    raise BenchError(f"unknown agent {name!r}; choose random or mlp")


# -- measuring -----------------------------------------------------------------------------
def _action_pool(space: Any, n: int, seed: int) -> list:
    """``n`` random actions in the form the collector passes to ``env.step``."""
    a = random_action_fn(space, np.random.default_rng(seed))(n)
    if isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.kind in "iub":
        return a.tolist()
    if isinstance(a, dict):
        return [{k: v[i] for k, v in a.items()} for i in range(n)]
    return list(a)


def _median_rate(run_chunk: Callable[[float], tuple], seconds: float,
                 n_chunks: int = ROUNDS) -> float:
    """Median of ``n_chunks`` rates; ``run_chunk(s)`` works >= s seconds, returns (units, dt)."""
    rates = []
    for _ in range(n_chunks):
        units, dt = run_chunk(seconds / n_chunks)
        rates.append(units / dt)
    return statistics.median(rates)


def _env_chunks(env: Any, seed: int) -> Callable[[float], tuple]:
    """A chunk runner stepping ``env`` alone with random actions (reset when done)."""
    env.reset(seed=seed)
    pool = _action_pool(env.action_space, 4096, seed)
    state = {"i": 0}

    def chunk(target: float) -> tuple:
        step, reset, n_pool = env.step, env.reset, len(pool)
        i, n = state["i"], 0
        t0 = time.perf_counter()
        while True:
            for _ in range(64):
                _, _, te, tr, _ = step(pool[i])
                i = i + 1 if i + 1 < n_pool else 0
                if te or tr:
                    reset()
            n += 64
            dt = time.perf_counter() - t0
            if dt >= target:
                state["i"] = i
                return n, dt

    chunk(0.02)  # warm-up
    return chunk


def env_alone(env_fn: Callable[[], Any], seconds: float = 3.0, seed: int = 0) -> float:
    """Steps per second of one env stepping random actions in this process (reset when done).

    The reference for every kind: ``n`` workers can at best step ``n`` times this.
    """
    env = env_fn()
    try:
        return _median_rate(_env_chunks(env, seed), seconds)
    finally:
        try:
            env.close()
        except Exception:
            pass


def _env_alone_worker(payload: bytes, conn) -> None:
    import signal

    import cloudpickle
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    env = None
    try:
        env_fn, seed = cloudpickle.loads(payload)
        env = env_fn()
        chunk = _env_chunks(env, seed)
        conn.send("ready")
        while True:
            target = conn.recv()
            if target is None:
                break
            conn.send(chunk(target))
    except (EOFError, OSError):  # the parent is gone
        pass
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
    finally:
        if env is not None:
            env.close()


def _answer(conn, timeout: float) -> Any:
    try:
        return conn.recv() if conn.poll(timeout) else f"no answer in {timeout:g} s"
    except (EOFError, OSError):
        return "it exited"


class _ParallelEnvAlone:
    """``n`` processes, each stepping one env alone, timed together: what this machine
    gives ``n`` workers at best right now (cores, SMT, other load), with no sampler."""

    def __init__(self, env_fn: Callable, n: int, start_method: str | None):
        import cloudpickle
        ctx = mp.get_context(start_method)
        self.procs, self.conns = [], []
        self.slowest: list = []  # per chunk, the rate of the slowest process
        try:
            for i in range(n):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_env_alone_worker, daemon=True,
                                name=f"sampling-bench-env-{i}",
                                args=(cloudpickle.dumps((env_fn, i)), child))
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            for c in self.conns:
                msg = _answer(c, 60.0)
                if msg != "ready":
                    raise BenchError(f"a process stepping the env alone failed: {msg}")
        except BaseException:
            self.close()
            raise

    def chunk(self, target: float) -> tuple:
        """Run all processes for ``target`` seconds; returns (their summed rate, 1.0)."""
        for c in self.conns:
            c.send(target)
        rates = []
        for c in self.conns:
            msg = _answer(c, 60.0 + 10 * target)
            if not isinstance(msg, tuple):
                raise BenchError(f"a process stepping the env alone failed: {msg}")
            n, dt = msg
            rates.append(n / dt)
        self.slowest.append(min(rates))
        return sum(rates), 1.0

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []


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


class _TimedAgent:
    """An rlpyt-style agent proxy that adds up the seconds spent in ``step``."""

    def __init__(self, agent: Any):
        self._agent = agent
        self._ids = _accepts_env_ids(agent.step)
        self.seconds = 0.0

    def step(self, observation, prev_action, prev_reward, env_ids=None):
        t0 = time.perf_counter()
        if self._ids:
            out = self._agent.step(observation, prev_action, prev_reward, env_ids=env_ids)
        else:
            out = self._agent.step(observation, prev_action, prev_reward)
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


def _agent_call_s(agent: Any, obs_space: Any, act_space: Any, sizes: Sequence[int],
                  budget_s: float, sample_obs: Any = None) -> dict:
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
        args[n] = (_tile(sample_obs, n), np.zeros((n,) + act_shape, act_dtype),
                   np.zeros(n, np.float32), np.arange(n))
        runner.step(*args[n])  # warm-up (first torch calls are slow)
    # Round robin over the sizes, so that a burst of load elsewhere hits all of them alike.
    times: dict = {n: [] for n in sizes}
    end = time.perf_counter() + budget_s
    while len(times[sizes[-1]]) < 2 or (time.perf_counter() < end
                                        and len(times[sizes[-1]]) < 500):
        for n in sizes:
            t0 = time.perf_counter()
            runner.step(*args[n])
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def _tile(obs: Any, n: int) -> Any:
    if isinstance(obs, dict):
        return {k: _tile(v, n) for k, v in obs.items()}
    a = np.asarray(obs)
    return np.ascontiguousarray(np.broadcast_to(a, (n,) + a.shape))


def _kind_workers(kind: str, n_workers: int, batch_B: int) -> int:
    """Worker count the benchmark uses for ``kind`` (alternating kinds need an even count)."""
    k = KINDS[kind]
    if not k.workers:
        return 0
    if k.groups == 2:
        n = max(2, n_workers - n_workers % 2)
        return min(n, batch_B - batch_B % 2) if batch_B >= 2 else n
    return min(n_workers, batch_B)


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
    W = _kind_workers(kind, n_workers, 2 * n_workers)
    T = 64
    with make_sampler(kind, _NoopEnv, _ZeroPolicy(), batch_T=T, batch_B=W, n_workers=W,
                      start_method=start_method) as s:
        s.obtain_samples(0)
        steps_per_s = _median_rate(_sampler_chunks(s), seconds, n_chunks=3)
    return 1e6 * W / steps_per_s


def _breakdown(r: dict, env_step_s: float, agent_est_s: dict, batch_B: int,
               serial_prof: dict | None) -> dict:
    """Fractions of wall time per batch step: envs, agent, the rest (see format_report)."""
    k = KINDS[r["kind"]]
    W = r["workers"]
    wall_step = batch_B / r["steps_per_s"]
    if not k.workers and serial_prof is not None:  # measured around each call
        env_f, env_est = serial_prof["env_s"] / serial_prof["elapsed_s"], False
        agent_f, agent_est = serial_prof["agent_s"] / serial_prof["elapsed_s"], False
    else:
        # The envs on the critical path: all (serial), or one worker's (rounded up).
        envs_on_path = batch_B if not k.workers else -(-batch_B // W)
        env_f, env_est = envs_on_path * env_step_s / wall_step, True
        if r["agent_s"] is not None:
            agent_f, agent_est = r["agent_s"] / r["elapsed_s"], False
        else:
            agent_f, agent_est = agent_est_s[-(-batch_B // W)] / wall_step, True
    other = 1.0 - env_f - agent_f
    return {"env": env_f, "agent": agent_f, "other": max(0.0, other),
            "overlapped": other < 0 and k.overlap,
            "env_estimated": env_est, "agent_estimated": agent_est,
            "overhead_us_per_step": max(0.0, other) * wall_step * 1e6}


def benchmark(env_fn: Callable, agent: Any, *, batch_T: int = 128, batch_B: int = 16,
              n_workers: int | None = None, kinds: Sequence[str] = ALL_KINDS,
              seconds: float = 3.0, start_method: str | None = None,
              progress: Callable[[str], None] = lambda msg: None,
              spaces: tuple | None = None) -> dict:
    """Measure the env alone and each of ``kinds`` for ``seconds`` each; return a report.

    All samplers are started (and warmed up with one batch) first; then ``ROUNDS``
    rounds each time one chunk of whole batches per kind and one of the env alone, in a
    rotating order, so that load from other processes hits every figure alike. A rate is
    the median over the rounds.
    """
    cpus = usable_cpus()
    W = n_workers if n_workers is not None else min(batch_B, cpus)
    busy0, own0, t_start = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    if spaces is None:
        spaces = check_env(env_fn, getattr(env_fn, "__name__", repr(env_fn)))
    sizes = {batch_B} | {-(-batch_B // w) for w in (_kind_workers(k, W, batch_B)
                                                   for k in kinds) if w}
    progress("timing the agent...")
    try:  # time a copy: the agent's own state (e.g. its random stream) stays untouched
        twin = copy.deepcopy(agent)
    except Exception:
        twin = agent
    agent_s = _agent_call_s(twin, *spaces, sizes, 0.3)
    results: dict = {}
    timed: dict = {}
    with ExitStack() as stack:
        env = env_fn()
        stack.callback(env.close)
        chunks = {None: _env_chunks(env, 0)}  # None: the env alone
        if W > 1:
            progress(f"starting {W} processes that step the env alone...")
            par = _ParallelEnvAlone(env_fn, W, start_method)
            stack.callback(par.close)
            chunks["parallel"] = par.chunk
        for kind in kinds:
            w = _kind_workers(kind, W, batch_B)
            progress(f"starting {kind}" + (f" ({w} workers)" if w else "") + "...")
            k = KINDS[kind]
            if not k.workers or k.served:  # the parent runs the agent: time it there
                timed[kind] = _timed(agent)
            try:
                s = stack.enter_context(make_sampler(
                    kind, env_fn, timed.get(kind, agent), batch_T=batch_T, batch_B=batch_B,
                    n_workers=w or None, start_method=start_method))
            except (ValueError, TypeError) as e:  # e.g. batch_B not splittable in two groups
                results[kind] = {"kind": kind, "workers": w, "skipped": str(e)}
                continue
            s.obtain_samples(0)  # warm-up
            chunks[kind] = _sampler_chunks(s)
            results[kind] = {"kind": kind, "workers": s.n_workers}
            if kind in timed:
                timed[kind].seconds = 0.0
        if "serial" in kinds:
            # A second serial sampler with timing proxies around env.step and the agent:
            # where serial's time goes, measured in the same rounds (its own rate, a little
            # lower because of the proxies, is not reported).
            progress("starting serial with env.step timed...")
            env_total = [0.0]
            prof_agent = _timed(twin)
            s = stack.enter_context(make_sampler(
                "serial", lambda: _TimedEnv(env_fn(), env_total), prof_agent,
                batch_T=batch_T, batch_B=batch_B))
            s.obtain_samples(0)
            env_total[0] = prof_agent.seconds = 0.0
            chunks["profile"] = _sampler_chunks(s)
        rates: dict = {name: [] for name in chunks}
        steps = dict.fromkeys(chunks, 0)
        elapsed = dict.fromkeys(chunks, 0.0)
        order = list(chunks)
        for rnd in range(ROUNDS):
            names = order[rnd % len(order):] + order[:rnd % len(order)]
            label = {None: "the env alone", "parallel": f"{W} envs alone",
                     "profile": "serial with env.step timed"}
            progress(f"round {rnd + 1}/{ROUNDS}: measuring "
                     + ", ".join(label.get(n, n) for n in names) + "...")
            for name in names:
                units, dt = chunks[name](seconds / ROUNDS / (2 if name == "profile" else 1))
                rates[name].append(units / dt)
                elapsed[name] += dt
                steps[name] += units
    serial_prof = None
    if "profile" in chunks:
        serial_prof = {"env_s": env_total[0], "agent_s": prof_agent.seconds,
                       "elapsed_s": elapsed["profile"],
                       "env_step_s": env_total[0] / steps["profile"]}
    alone = statistics.median(rates[None])
    par_alone = statistics.median(rates["parallel"]) if "parallel" in rates else alone
    # Cores of a VM can run at different speeds at once (another tenant on one of them): a
    # kind that waits for every worker each batch gets at most W x the slowest process.
    par_slowest = statistics.median(par.slowest) if "parallel" in rates else alone
    for kind, r in results.items():
        if "skipped" in r:
            continue
        r["steps_per_s"] = statistics.median(rates[kind])
        r["steps_per_s_rounds"] = rates[kind]
        r["steps_per_s_iqr"] = list(spread(rates[kind]))
        r["elapsed_s"] = elapsed[kind]
        r["agent_s"] = timed[kind].seconds if kind in timed else None
        ideal_x = 1 if not r["workers"] else min(r["workers"], cpus)
        r["ratio_to_env_alone"] = r["steps_per_s"] / alone
        r["share_of_ideal"] = r["steps_per_s"] / (alone * ideal_x)
        if r["workers"] in (0, W):
            r["share_of_parallel_env_alone"] = r["steps_per_s"] / (par_alone if r["workers"]
                                                                   else alone)
        r["breakdown"] = _breakdown(r, 1.0 / alone, agent_s, batch_B, serial_prof)
        if KINDS[kind].served:
            progress(f"measuring the {kind} handoff (no-op env and agent)...")
            r["handoff_us"] = handoff_us(kind, W, seconds=min(0.6, max(0.15, seconds / 5)),
                                         start_method=start_method)
    busy1, own1 = _busy_cpu_s(), _own_cpu_s()
    other = None
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.perf_counter() - t_start)
    ok = {kind: r for kind, r in results.items() if "skipped" not in r}
    pick = pick_kind({kind: rates[kind] for kind in ok}) if ok else None
    return {"batch_T": batch_T, "batch_B": batch_B, "workers": W, "usable_cpus": cpus,
            "start_method": start_method or mp.get_start_method(allow_none=True)
            or mp.get_context().get_start_method(),
            "seconds_per_kind": seconds, "other_load_cpus": other,
            "env_alone_steps_per_s": alone, "parallel_env_alone_steps_per_s": par_alone,
            "parallel_env_alone_slowest_steps_per_s": par_slowest,
            "env_step_us_in_serial": serial_prof["env_step_s"] * 1e6 if serial_prof else None,
            "agent_us_per_call": {str(n): s * 1e6 for n, s in sorted(agent_s.items())},
            "results": list(results.values()),
            "best": pick["best"] if pick else None,
            "fastest": pick["fastest"] if pick else None,
            "tied_with": pick["tied_with"] if pick else [],
            "recommendation": _recommend(ok[pick["best"]], pick) if pick else "no kind could run"}


def spread(round_rates: Sequence[float]) -> tuple:
    """(first quartile, third quartile) of a figure's per-round rates: how much it varies
    from round to round, the load of other processes included."""
    if len(round_rates) < 2:
        return round_rates[0], round_rates[0]
    q1, _, q3 = statistics.quantiles(round_rates, n=SPREAD_QUARTILES, method="inclusive")
    return q1, q3


def pick_kind(round_rates: dict) -> dict:
    """The kind to recommend, from each kind's per-round rates (``{kind: [steps/s, ...]}``).

    ``fastest`` has the highest median. Another kind *ties* with it when their spreads
    overlap (its third quartile reaches the fastest's first): the difference between the two
    medians is within what the rounds themselves vary, and which one is faster would flip
    between runs. Of the fastest and the kinds tied with it, ``best`` is the first in
    :data:`PREFERENCE` (the simplest); ``tied_with`` lists the others in that order (empty
    when the fastest wins clearly). Returns ``{"best", "fastest", "tied_with"}``.
    """
    order = [k for k in PREFERENCE if k in round_rates] + sorted(set(round_rates) - set(PREFERENCE))
    medians = {k: statistics.median(round_rates[k]) for k in order}
    fastest = max(order, key=lambda k: medians[k])  # equal medians: the simpler one
    floor = spread(round_rates[fastest])[0]
    tied = [k for k in order if spread(round_rates[k])[1] >= floor]
    return {"best": tied[0], "fastest": fastest, "tied_with": tied[1:]}


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


def _recommend(r: dict, pick: dict | None = None) -> str:
    """One line: the recommended kind ``r``, why it is fast or slow, and any tie (``pick``)."""
    b = r["breakdown"]
    env, agent, other = b["env"], b["agent"], b["other"]
    if env >= max(agent, other):
        why = f"envs dominate (agent {agent:.0%} of the time)"
    elif agent >= other:
        why = f"the agent dominates ({agent:.0%} of the time; envs {env:.0%})"
    else:
        why = (f"sampler overhead dominates ({other:.0%} of the time; envs {env:.0%}, "
               f"agent {agent:.0%})")
    w = f", {r['workers']} workers" if r["workers"] else ""
    text = (f"{r['kind']}: {r['ratio_to_env_alone']:.2f}x the env alone "
            f"({r['share_of_ideal']:.0%} of the ideal{w}); {why}")
    if pick and pick["tied_with"]:
        group = [r["kind"]] + pick["tied_with"]
        others = [k for k in group if k != pick["fastest"]]
        verb = "is" if len(others) == 1 else "are"
        text += (f". Tie: {pick['fastest']} measured fastest, but {', '.join(others)} {verb} "
                 f"within the rounds' spread of it (interquartile ranges over the {ROUNDS} rounds "
                 f"overlap), so which is faster is noise; picked the simplest, by the order "
                 f"{' < '.join(PREFERENCE)}")
    return text


def format_report(rep: dict) -> str:
    """The human-readable table of a :func:`benchmark` report."""
    alone, W = rep["env_alone_steps_per_s"], rep["workers"]
    par = rep.get("parallel_env_alone_steps_per_s")
    lines = [
        f"env {rep.get('env', '?')}"
        + (f" {json.dumps(rep['env_kwargs'])}" if rep.get("env_kwargs") else "")
        + f", agent {rep.get('agent', '?')}"
        + (f" (torch threads {rep['torch_threads']})" if rep.get("torch_threads") else "")
        + f", T={rep['batch_T']}, B={rep['batch_B']}, {W} workers, {rep['usable_cpus']} "
        f"usable CPUs, start method {rep['start_method']}, {rep['seconds_per_kind']:g} s per kind",
        f"env alone (one env, one process): {alone:,.0f} steps/s ({1e6 / alone:.3g} us/step)"
        + (f"; env.step in the serial sampler: {rep['env_step_us_in_serial']:.3g} us"
           if rep.get("env_step_us_in_serial") else ""),
    ]
    if W > 1 and par:
        lines.append(f"{W} envs alone, {W} processes at once: {par:,.0f} steps/s "
                     f"({par / alone:.2f}x one)")
        slow = rep.get("parallel_env_alone_slowest_steps_per_s")
        if slow:
            lines.append(f"  the slowest of them: {slow:,.0f} steps/s; {W} x that = "
                         f"{W * slow / alone:.2f}x one, the most a kind that waits for every "
                         f"worker can reach")
    lines += [
        "agent: " + ", ".join(f"{us:.3g} us per call on {n} envs"
                             for n, us in rep["agent_us_per_call"].items()),
        "",
        f"{'kind':<23}{'workers':>8}{'steps/s':>10}{'x alone':>9}{'of ideal':>9}"
        f"{'of W alone':>11}  where the time goes (env / agent / other)",
    ]
    notes = set()
    for r in rep["results"]:
        if "skipped" in r:
            lines.append(f"{r['kind']:<23}{r['workers'] or '-':>8}  skipped: {r['skipped']}")
            continue
        b = r["breakdown"]
        env = ("~" if b["env_estimated"] else "") + f"{b['env']:.0%}"
        agent = ("~" if b["agent_estimated"] else "") + f"{b['agent']:.0%}"
        other = "overlapped" if b["overlapped"] else f"{b['other']:.0%}"
        if b["env_estimated"] or b["agent_estimated"]:
            notes.add("~")
        where = f"{env} / {agent} / {other}"
        if "handoff_us" in r:
            where += f"; handoff {r['handoff_us']:.0f} us/step"
        of_w = r.get("share_of_parallel_env_alone")
        lines.append(f"{r['kind']:<23}{r['workers'] or '-':>8}{r['steps_per_s']:>10,.0f}"
                     f"{r['ratio_to_env_alone']:>8.2f}x{r['share_of_ideal']:>9.0%}"
                     f"{'-' if of_w is None else format(of_w, '.0%'):>11}  {where}")
    lines += [
        "",
        "x alone: steps/s over the env alone. of ideal: over the env alone x min(workers,",
        "  usable CPUs) (x 1 for serial). of W alone: over W envs stepping alone in W",
        "  processes at once, measured in the same rounds (what the machine gives W workers",
        "  now). env / agent / other: shares of the wall time of the process on the critical",
        "  path; other = sampler bookkeeping, waiting, handoffs, CPU contention.",
    ]
    if "~" in notes:
        lines.append("~ = estimated: a worker's env time as its envs x the env-alone step time; "
                     "cpu's agent\n  time from timing the agent alone in the parent on one "
                     "worker's envs (warm caches:\n  a lower bound; compare serial's measured "
                     "agent share).")
    if any("handoff_us" in r for r in rep["results"]):
        lines.append("handoff: wall time per batch step with a no-op env and agent, one env per "
                     "worker\n  (the action server's round trip, bookkeeping included).")
    if rep.get("other_load_cpus") is not None and rep["other_load_cpus"] >= 0.2:
        lines.append(f"note: other processes kept {rep['other_load_cpus']:.1f} CPUs busy on "
                     f"average during the run;\n  they compete with the sampler and lower "
                     f"the parallel kinds' figures.")
    lines.append(f"recommendation: {rep['recommendation']}")
    return "\n".join(lines)


# -- auto ----------------------------------------------------------------------------------
def _uses_cuda(agent: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    objs = [agent] + (list(vars(agent).values()) if hasattr(agent, "__dict__") else [])
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            if obj.is_cuda:
                return True
        elif isinstance(obj, torch.nn.Module):
            if any(p.is_cuda for p in obj.parameters()):
                return True
    return False


def choose_kind(env_fn: Callable, agent: Any, opts: Any, n_workers: int | None) -> tuple:
    """Pick a kind for ``make_sampler("auto", ...)`` from a short probe; return (kind, reason).

    The probe (about 1 s) builds one separate env from ``env_fn`` (never a training env;
    closed afterwards), times ``env.step`` with random actions (e = seconds per env step,
    plus ``COLLECT_S`` of sampler bookkeeping) and times the agent in this process on
    n = B, B/2 and B/W copies of the first observation (a(n) = seconds per call).
    (The agent is called on probe observations, as the sampler's own probe does;
    ``make_sampler`` restores the random states around both, so they consume none.)

    Rule, with B envs, W workers, C usable CPUs and h = ``HANDOFF_S`` per action-server
    step: each kind's wall time per batch step is predicted as
    ``max(critical path, CPU work / C)``:

    ==========  ==============================  =========================
    kind        critical path                   CPU work
    ==========  ==============================  =========================
    serial      B e + a(B)                      same
    cpu         (B/W) e + a(B/W)                B e + W a(B/W)
    gpu         (B/W) e + a(B) + h              B e + a(B) + h
    alternating max(2 a(B/2), (B/W) e + a(B/2)) B e + 2 a(B/2) + 2 h
                + h
    ==========  ==============================  =========================

    and the fastest is picked, preferring the simpler kind (in the order above) unless
    another is predicted more than 10% faster. So: serial when there is one usable CPU,
    one env or one worker; cpu when the envs dominate and the agent is cheap (each
    worker runs its own copy); gpu or alternating when the agent is expensive compared
    with one worker's envs (one batched call in the parent beats W small ones), and in
    particular when it lives on a GPU. cpu is ruled out when the agent's parameters are
    on a GPU, or when it cannot be pickled and workers do not fork; alternating needs
    an even W and two equal groups of envs. no_overlap_alternating exists for rlpyt
    parity and is never predicted faster than gpu, so auto never picks it.
    """
    B = opts.batch_B
    cpus = usable_cpus()
    W = n_workers if n_workers is not None else min(B, cpus)
    if cpus == 1 or B == 1 or W == 1:
        why = ("1 usable CPU" if cpus == 1 else "batch_B=1" if B == 1 else "n_workers=1")
        return _picked("serial", f"{why}: worker processes cannot run in parallel")
    t0 = time.perf_counter()
    e, spaces, first_obs = _probe_env(env_fn, opts.seed)
    e += COLLECT_S
    Wg = W
    cands = ["serial", "cpu", "gpu"]
    excluded = []
    try:
        with warnings.catch_warnings():  # make_sampler warns about n_workers > batch_B itself
            warnings.simplefilter("ignore")
            Wg = worker_count("alternating", B, n_workers)
        cands.append("alternating")
    except ValueError:
        excluded.append("alternating (needs an even worker count and two equal env groups)")
    if _uses_cuda(agent):
        cands.remove("cpu")
        excluded.append("cpu (the agent is on a GPU)")
    elif not _cpu_can_ship(agent, opts.start_method):
        cands.remove("cpu")
        excluded.append("cpu (the agent cannot be pickled for spawn/forkserver workers)")
    per_w = -(-B // W)
    sizes = {B, per_w} | ({B // 2} if "alternating" in cands else set())
    a = _agent_call_s(agent, *spaces, sizes, PROBE_AGENT_S, sample_obs=first_obs)
    h = HANDOFF_S
    pred = {"serial": B * e + a[B]}
    if "cpu" in cands:
        pred["cpu"] = max(per_w * e + a[per_w], (B * e + W * a[per_w]) / cpus)
    pred["gpu"] = max(per_w * e + a[B] + h, (B * e + a[B] + h) / cpus)
    if "alternating" in cands:
        pw = -(-B // Wg)
        ah = a[B // 2]
        pred["alternating"] = max(max(2 * ah, pw * e + ah) + h, (B * e + 2 * ah + 2 * h) / cpus)
    kind = "serial"
    for k in cands[1:]:
        if pred[k] < pred[kind] / 1.1:
            kind = k
    speedup = pred["serial"] / pred[kind]
    probe_s = time.perf_counter() - t0
    why = (f"env {e * 1e6:.3g} us/step, agent {a[B] * 1e6:.3g} us on {B} envs"
           + (f" / {a[per_w] * 1e6:.3g} us on {per_w}" if per_w != B else "")
           + f"; model: {speedup:.2f}x serial with {W} workers on {cpus} idle CPUs")
    if kind == "cpu" and B * e >= W * a[per_w]:
        lead = "envs dominate and the agent is cheap: each worker runs its own copy"
    elif kind == "cpu":
        lead = ("the agent costs more than the envs but runs on the CPU: W copies in "
                "parallel beat one call in the parent")
    elif kind in ("gpu", "alternating"):
        lead = "the agent is expensive next to one worker's envs: one batched call in the parent"
    else:
        lead = "parallel kinds are not predicted faster"
    reason = f"{lead} ({why}"
    if excluded:
        reason += "; ruled out: " + ", ".join(excluded)
    reason += f"; probe {probe_s:.1f} s)"
    return _picked(kind, reason)


def _picked(kind: str, reason: str) -> tuple:
    log.info("auto picked %s: %s", kind, reason)
    return kind, reason


def _cpu_can_ship(agent: Any, start_method: str | None) -> bool:
    method = (start_method or mp.get_start_method(allow_none=True)
              or mp.get_context().get_start_method())
    if method == "fork":
        return True
    import cloudpickle
    try:
        cloudpickle.dumps(agent)
    except Exception:
        return False
    return True


def _probe_env(env_fn: Callable, seed: int) -> tuple:
    """Seconds per step of a separate env (random actions), its spaces, its first obs."""
    env = env_fn()
    try:
        obs, _ = env.reset(seed=seed)
        pool = _action_pool(env.action_space, 256, seed)
        step = env.step
        t0 = time.perf_counter()
        _, _, te, tr, _ = step(pool[0])  # the first step can be slow (lazy init)
        first = time.perf_counter() - t0
        if te or tr:
            env.reset()
        block = max(1, min(64, int(20e-6 / max(first, 1e-9))))  # >= ~20 us per timing
        times, n, i = [], 0, 1
        end = time.perf_counter() + PROBE_ENV_S
        while not times or (time.perf_counter() < end and n < 50000):
            t0 = time.perf_counter()
            for _ in range(block):
                _, _, te, tr, _ = step(pool[i])
                i = (i + 1) % len(pool)
                if te or tr:
                    env.reset()
            times.append((time.perf_counter() - t0) / block)
            n += block
        return statistics.median(times), (env.observation_space, env.action_space), obs
    finally:
        try:
            env.close()
        except Exception:
            pass

