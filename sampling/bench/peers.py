"""``python -m sampling.bench.peers``: this library side by side with its peers, in one run.

Imports the rest of the benchmark and the public core; gymnasium (and, where installed,
stable-baselines3 and envpool) only here. Every contestant steps the same env with random
actions drawn beforehand, one chunk per contestant per round in a rotating order, so that
load from other processes hits every figure alike (a rate is the median over the rounds).
The references: one env alone in this process, and W envs alone in W processes (what this
machine gives W workers right now). Contestants that step envs for a script
(``envs.step(actions)``): gymnasium's SyncVectorEnv and AsyncVectorEnv(shared_memory=True),
``sampling.make_vector_env``, SB3's SubprocVecEnv, EnvPool's C++ version of a gymnasium id
(sync and async); and this library's sampler kinds with a random agent (``--kinds``), on
the env and, with ``--vector-env``, on a vector version of it (one per worker).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
from contextlib import ExitStack
from typing import Any, Callable

import numpy as np

from ..agents import RandomAgent
from ..api import make_sampler, make_vector_env
from ..spaces import random_action_fn
from .inputs import (
    BenchError,
    check_env,
    checked_common,
    env_width,
    print_report,
    resolve_env,
)
from .measure import _env_chunks, _ParallelEnvAlone, _reference, _rounds, _sampler_chunks
from .report import ROUNDS, spread

__all__ = ["main", "side_by_side"]

ACTION_ROWS = 256   # batches of random actions drawn before timing, then cycled
CALLS_PER_CLOCK = 8  # vector steps between two looks at the clock


def _vector_chunks(envs: Any, space: Any, n: int) -> Callable[[float], tuple]:
    """A chunk runner stepping a vector env (any with gymnasium's step) with random actions;
    its units are env steps (``n`` per call)."""
    draw = random_action_fn(space, np.random.default_rng(0))
    rows = [draw(n) for _ in range(ACTION_ROWS)]
    envs.reset(seed=0)
    state = [0]

    def chunk(target: float) -> tuple:
        import time
        calls, i, t0 = 0, state[0], time.perf_counter()
        while True:
            for _ in range(CALLS_PER_CLOCK):
                envs.step(rows[i])
                i = i + 1 if i + 1 < ACTION_ROWS else 0
            calls += CALLS_PER_CLOCK
            dt = time.perf_counter() - t0
            if dt >= target:
                state[0] = i
                return calls * n, dt
    chunk(0.02)  # warm-up
    return chunk


def _envpool_chunks(env_id: str, space: Any, n: int, threads: int) -> dict:
    """EnvPool's own (C++) version of the env, where envpool is installed and has it: its
    synchronous step, and its asynchronous mode (half the envs per recv), on ``threads``
    threads."""
    try:
        import envpool
        sync = envpool.make(env_id, env_type="gymnasium", num_envs=n, num_threads=threads,
                            seed=0)
        pool = envpool.make(env_id, env_type="gymnasium", num_envs=n, batch_size=n // 2,
                            num_threads=threads, seed=0)
    except Exception:  # not installed, or not one of its envs
        return {}
    draw = random_action_fn(space, np.random.default_rng(0))
    pool.async_reset()

    def async_chunk(target: float) -> tuple:
        import time
        units, t0 = 0, time.perf_counter()
        while True:
            for _ in range(CALLS_PER_CLOCK):
                *_, info = pool.recv()
                ids = info["env_id"]
                pool.send(draw(len(ids)), ids)
                units += len(ids)
            dt = time.perf_counter() - t0
            if dt >= target:
                return units, dt
    async_chunk(0.02)
    return {"EnvPool (C++) sync": _vector_chunks(sync, space, n),
            "EnvPool (C++) async": async_chunk}


def _contestants(env_fn: Callable, n: int, workers: int, kinds: list, start_method: Any,
                 stack: ExitStack, env_id: str | None = None,
                 vector_env: str | None = None) -> dict:
    """``{name: chunk runner}``, each started (and closed by ``stack``)."""
    chunks: dict = {}
    env = env_fn()
    stack.callback(env.close)
    chunks["env alone"] = _reference(_env_chunks, env, 0)
    par = _ParallelEnvAlone(env_fn, workers, start_method)
    stack.callback(par.close)
    chunks[f"{workers} envs alone"] = par.chunk
    space = env.action_space
    fns = [env_fn] * n
    makers = {"sampling make_vector_env": lambda: make_vector_env(
        fns, n_workers=workers, start_method=start_method)}
    try:
        import gymnasium
        makers["gymnasium SyncVectorEnv"] = lambda: gymnasium.vector.SyncVectorEnv(fns)
        makers["gymnasium AsyncVectorEnv"] = lambda: gymnasium.vector.AsyncVectorEnv(
            fns, shared_memory=True, context=start_method)
    except ImportError:
        pass
    try:
        from stable_baselines3.common.vec_env import SubprocVecEnv
        makers["SB3 SubprocVecEnv"] = lambda: _Sb3(SubprocVecEnv(fns, start_method))
    except ImportError:
        pass
    for name, make in makers.items():
        try:
            envs = make()
        except Exception as e:  # e.g. gymnasium's wrappers need gymnasium's spaces
            print(f"{name}: left out ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        stack.callback(envs.close)
        chunks[name] = _vector_chunks(envs, space, n)
    if env_id is not None:
        chunks.update(_envpool_chunks(env_id, space, n, workers))
    for kind in kinds:
        s = stack.enter_context(make_sampler(
            kind, env_fn, RandomAgent(space), batch_T=128, batch_B=n,
            n_workers=workers if kind != "serial" else None, start_method=start_method))
        s.obtain_samples(0)
        chunks[f"sampling {kind}"] = _sampler_chunks(s)
    for kind in kinds if vector_env else ():
        # the same n columns as one vector env per worker (serial: one of all n)
        w = 1 if kind == "serial" else workers
        if n % w:
            raise BenchError(f"--vector-env: -B {n} does not split into {w} vector envs")
        fn = resolve_env(vector_env, {"num_envs": n // w}, "--vector-env")
        if env_width(fn, vector_env, "--vector-env") != n // w:
            raise BenchError(f"--vector-env {vector_env!r}: its factory(num_envs={n // w}) "
                             f"did not return a vector env of {n // w} envs")
        s = stack.enter_context(make_sampler(
            kind, fn, RandomAgent(space),
            batch_T=128, batch_B=n, n_workers=None if kind == "serial" else w,
            start_method=start_method))
        s.obtain_samples(0)
        chunks[f"sampling {kind}, {w}x{n // w} vector"] = _sampler_chunks(s)
    return chunks


class _Sb3:
    """SB3's VecEnv (reset without seed, step returning 4 values) as this script steps it."""

    def __init__(self, envs: Any):
        self.envs = envs

    def reset(self, seed=None):
        self.envs.seed(seed)
        return self.envs.reset()

    def step(self, actions):
        return self.envs.step(actions)

    def close(self):
        self.envs.close()


def side_by_side(env_fn: Callable, n: int, workers: int, kinds: list, seconds: float,
                 start_method: Any = None, progress: Callable = lambda msg: None,
                 env_id: str | None = None, vector_env: str | None = None) -> dict:
    """Rates of every contestant (env steps per second: median and quartiles over
    ``ROUNDS`` interleaved rounds), and their ratios to the env alone and to W envs alone."""
    with ExitStack() as stack:
        chunks = _contestants(env_fn, n, workers, kinds, start_method, stack, env_id,
                              vector_env)
        rates, _, _ = _rounds(chunks, seconds, workers, progress)
    alone = statistics.median(rates["env alone"])
    par = statistics.median(rates[f"{workers} envs alone"])
    rows = [{"name": name, "steps_per_s": statistics.median(r),
             "steps_per_s_iqr": list(spread(r)),
             "x_env_alone": statistics.median(r) / alone,
             "share_of_w_alone": statistics.median(r) / par} for name, r in rates.items()]
    return {"num_envs": n, "workers": workers, "rounds": ROUNDS, "seconds": seconds,
            "results": rows}


def _table(rep: dict) -> str:
    head = (f"{rep['num_envs']} envs, {rep['workers']} workers, {rep['rounds']} interleaved "
            f"rounds; env steps per second (median, quartiles)")
    lines = [head, f"{'contestant':<28} {'steps/s':>10} {'quartiles':>19} {'x env alone':>12} "
                   f"{'of W alone':>11}"]
    for r in rep["results"]:
        q1, q3 = r["steps_per_s_iqr"]
        lines.append(f"{r['name']:<28} {r['steps_per_s']:>10.0f} {q1:>9.0f}..{q3:<9.0f} "
                     f"{r['x_env_alone']:>12.2f} {r['share_of_w_alone']:>10.0%}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.peers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="CartPole-v1", help="a gymnasium id or module:factory")
    p.add_argument("--env-kwargs", default=None, metavar="JSON")
    p.add_argument("-B", "--num-envs", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kinds", default="", help="sampler kinds to add, e.g. serial,cpu")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per contestant")
    p.add_argument("--vector-env", default=None, metavar="MODULE:FACTORY",
                   help="also run each of --kinds on vector envs made by FACTORY(num_envs=), "
                        "one per worker, e.g. sampling.envs:make_vector_cartpole (a stand-in "
                        "for --env: the same env, stepped many at a time)")
    p.add_argument("--start-method", default=None, choices=mp.get_all_start_methods())
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    env_kwargs = checked_common(p, args)
    kinds = [k for k in args.kinds.split(",") if k]
    if args.num_envs < 1 or args.workers < 1:
        p.error("-B and --workers must be >= 1")
    if args.vector_env and not kinds:
        p.error("--vector-env runs the sampler kinds on a vector env: name them with --kinds")

    def measure(progress: Callable) -> dict:
        env_fn = resolve_env(args.env, env_kwargs)
        check_env(env_fn, args.env)
        return side_by_side(env_fn, args.num_envs, args.workers, kinds, args.seconds,
                            args.start_method, progress, None if ":" in args.env else args.env,
                            args.vector_env)
    return print_report(p, args.json, _table, measure)


if __name__ == "__main__":
    sys.exit(main())
