"""``python -m sampling.bench.model``: where a sampler's time goes on one env, as a model that
adds up to the measured serial and cpu rates.

Every figure comes from one run of interleaved rounds (see :func:`.measure._rounds`):

- the env alone in this process, B of them stepped round-robin (what B envs cost without a
  sampler: cache effects show here), and W envs alone in W processes (what this machine
  gives W workers);
- the sampler's own costs, measured with an *echo env* that costs almost nothing a step,
  returns the real env's first observation and ends its episodes at the real env's mean
  length: per env step (serial with 1 and with B envs, episodes never ending, less the echo
  env's own call, timed round-robin without a sampler), per batch
  step (the same pair's intercept: the agent call and the row bookkeeping), per episode
  (episodes of the mean length against none), and, in the cpu kind, per batch (batches of
  ``T_SHORT`` and of T steps: the command, the workers' replies, waking up);
- serial and cpu on the env itself.

The model: serial's time per env step = (B envs round-robin) + per env step + per batch
step / B + per episode / mean length; a cpu batch = T x (B/W env steps at that cost, scaled
by this machine's W-process slowdown, + one batch step) + per batch. What the cpu kind
loses beyond that is printed as its own row: the workers wait for the slowest one at every
batch end.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from contextlib import ExitStack
from typing import Any, Callable

from ..agents import RandomAgent
from ..api import make_sampler
from ..spaces import action_pool
from ..vector import is_vector
from .inputs import BenchError, check_env, checked_common, print_report, resolve_env
from .measure import (
    CLOCK_EVERY,
    DEFAULT_SECONDS,
    ENV_ACTIONS,
    _env_chunks,
    _ParallelEnvAlone,
    _reference,
    _rounds,
    _sampler_chunks,
)
from .report import ROUNDS

__all__ = ["model", "main"]

EPISODE_PROBE_STEPS = 5000  # random steps of the env alone that measure its mean episode
NEVER = 2 ** 62             # an echo env's episode length that no run reaches
T_SHORT = 16                # the cpu kind's short batch: its time is mostly the per-batch cost


class _EchoEnv:
    """Returns one fixed observation (the real env's first), reward 1.0, and truncates its
    episodes after ``length`` steps: the sampler's own cost, with the env's shapes."""

    def __init__(self, observation: Any, observation_space: Any, action_space: Any,
                 length: int):
        self.observation_space, self.action_space = observation_space, action_space
        self._obs, self._length, self._t = observation, length, 0

    def reset(self, *, seed=None, options=None):
        self._t = 0
        return self._obs, {}

    def step(self, action):
        self._t += 1
        return self._obs, 1.0, False, self._t >= self._length, {}

    def close(self):
        pass


def _mean_episode(env: Any) -> float:
    """Mean episode length of ``env`` under random actions (steps per finished episode)."""
    env.reset(seed=0)
    pool, episodes = action_pool(env.action_space, ENV_ACTIONS, 0), 0
    for i in range(EPISODE_PROBE_STEPS):
        _, _, te, tr, _ = env.step(pool[i % len(pool)])
        if te or tr:
            episodes += 1
            env.reset()
    return EPISODE_PROBE_STEPS / max(episodes, 1)


def _round_robin_chunks(envs: list) -> Callable[[float], tuple]:
    """A chunk runner stepping ``envs`` in turn with random actions, no sampler."""
    for i, env in enumerate(envs):
        env.reset(seed=i)
    pool = action_pool(envs[0].action_space, ENV_ACTIONS, 0)

    def chunk(target: float) -> tuple:
        i, n, t0 = 0, 0, time.perf_counter()
        while True:
            for _ in range(CLOCK_EVERY // len(envs) + 1):
                for env in envs:
                    _, _, te, tr, _ = env.step(pool[i])
                    i = i + 1 if i + 1 < len(pool) else 0
                    if te or tr:
                        env.reset()
                n += len(envs)
            dt = time.perf_counter() - t0
            if dt >= target:
                return n, dt
    return chunk


def model(env_fn: Callable, *, batch_T: int = 128, batch_B: int = 16, workers: int = 2,
          seconds: float = DEFAULT_SECONDS, start_method: str | None = None,
          progress: Callable = lambda msg: None) -> dict:
    """The measured components (microseconds) and the model's serial and cpu rates against
    the measured ones; see the module docstring."""
    T, B, W = batch_T, batch_B, workers
    if B % W:
        raise BenchError(f"-B {B} does not split evenly into {W} workers")
    with ExitStack() as stack:
        env = env_fn()
        stack.callback(env.close)
        if is_vector(env):
            raise BenchError("the model takes one env, not a vector env (python -m "
                             f"{__package__}.peers --vector-env measures those)")
        length = _mean_episode(env)
        obs, _ = env.reset(seed=0)

        def echo(ends: bool) -> Callable[[], _EchoEnv]:
            return lambda: _EchoEnv(obs, env.observation_space, env.action_space,
                                    round(length) if ends else NEVER)

        def sampler(kind: str, fn: Callable, n: int, t: int = T, w: int = W) -> Callable:
            s = stack.enter_context(make_sampler(
                kind, fn, RandomAgent(env.action_space), batch_T=t, batch_B=n,
                n_workers=None if kind == "serial" else w, start_method=start_method))
            s.obtain_samples(0)
            return _sampler_chunks(s)

        envs = [env_fn() for _ in range(B)]
        for e in envs:
            stack.callback(e.close)
        par = _ParallelEnvAlone(env_fn, W, start_method)
        stack.callback(par.close)
        chunks = {
            "env alone": _reference(_env_chunks, env, 0),
            f"{W} envs alone": par.chunk,
            "round-robin": _round_robin_chunks(envs),
            "echo round-robin": _round_robin_chunks([echo(False)() for _ in range(B)]),
            "serial": sampler("serial", env_fn, B),
            "cpu": sampler("cpu", env_fn, B),
            "cpu, 1 worker": sampler("cpu", env_fn, B // W, w=1),
            "echo 1": sampler("serial", echo(False), 1),
            "echo B": sampler("serial", echo(False), B),
            "echo B, episodes": sampler("serial", echo(True), B),
            "cpu echo, short": sampler("cpu", echo(False), B, T_SHORT),
            "cpu echo": sampler("cpu", echo(False), B),
        }
        rates, _, _ = _rounds(chunks, seconds, W, progress)
    us = {name: 1e6 / statistics.median(r) for name, r in rates.items()}  # per env step
    with_call = (us["echo B"] * B - us["echo 1"]) / (B - 1)
    per_step = us["echo 1"] - with_call
    # less the echo env's own call, which the env round-robin already counts for real envs
    per_env = with_call - us["echo round-robin"]
    per_episode = (us["echo B, episodes"] - us["echo B"]) * length
    # cpu, echo env: time per batch at T_SHORT and at T steps
    short, full = us["cpu echo, short"] * B * T_SHORT, us["cpu echo"] * B * T
    per_batch = short - (full - short) / (T - T_SHORT) * T_SHORT
    # each of W processes runs this much slower than one alone (1.0: no slowdown)
    slowdown = W * statistics.median(rates["env alone"]) / statistics.median(
        rates[f"{W} envs alone"])
    env_step = us["round-robin"] + per_env + per_episode / length  # one env step, no row
    serial_us = env_step + per_step / B
    cpu_batch = T * (B // W * env_step + per_step) * slowdown + per_batch
    components = {"env alone": us["env alone"], "B envs round-robin": us["round-robin"],
                  "sampler per env step": per_env, "sampler per batch step": per_step,
                  "sampler per episode": per_episode, "cpu per batch": per_batch}
    alone, w_alone = 1e6 / us["env alone"], statistics.median(rates[f"{W} envs alone"])
    # One worker with one worker's envs, W times, each slowed as W processes are: the cpu
    # kind without waiting for the slowest worker at each batch end
    one_worker = W / (us["cpu, 1 worker"] * slowdown)
    rows = []
    for kind, predicted in (("serial", 1e6 / serial_us), ("cpu", 1e6 * B * T / cpu_batch)):
        measured = 1e6 / us[kind]
        rows.append({"kind": kind, "predicted_steps_per_s": predicted,
                     "measured_steps_per_s": measured, "measured_over_predicted":
                     measured / predicted, "x_env_alone": measured / alone,
                     "share_of_w_alone": measured / w_alone})
    rows.append({"kind": f"cpu: {W} x (1 worker of {B // W} envs), slowed", "measured_steps_per_s":
                 1e6 * one_worker, "x_env_alone": 1e6 * one_worker / alone,
                 "share_of_w_alone": 1e6 * one_worker / w_alone})
    return {"batch_T": T, "batch_B": B, "workers": W, "rounds": ROUNDS,
            "mean_episode_length": length, "w_process_slowdown": slowdown,
            "components_us": components, "kinds": rows}


def _table(rep: dict) -> str:
    T, B, W, L = rep["batch_T"], rep["batch_B"], rep["workers"], rep["mean_episode_length"]
    c = rep["components_us"]
    per_env_step = {"B envs round-robin": c["B envs round-robin"],
                    "sampler per env step": c["sampler per env step"],
                    "sampler per batch step": c["sampler per batch step"] / B,
                    "sampler per episode": c["sampler per episode"] / L}
    total = sum(per_env_step.values())
    lines = [f"T={T}, B={B}, {W} workers, {rep['rounds']} interleaved rounds; episodes of "
             f"{L:.1f} steps (random actions); {W} processes each run "
             f"{rep['w_process_slowdown']:.2f}x slower than one alone",
             f"{'component':<26} {'us':>8} {'us per env step':>16} {'share':>6}",
             f"{'env alone':<26} {c['env alone']:>8.2f} {c['env alone']:>16.2f}"]
    for name, v in per_env_step.items():
        lines.append(f"{name:<26} {c[name]:>8.2f} {v:>16.2f} {v / total:>6.0%}")
    lines.append(f"{'cpu per batch':<26} {c['cpu per batch']:>8.1f} "
                 f"{c['cpu per batch'] / (T * B / W):>16.2f}")
    lines.append("")
    lines.append(f"{'kind':<8} {'model':>10} {'measured':>10} {'measured/model':>15} "
                 f"{'x env alone':>12} {'of W alone':>11}")
    for r in rep["kinds"]:
        if "predicted_steps_per_s" in r:
            head = (f"{r['kind']:<8} {r['predicted_steps_per_s']:>10.0f} "
                    f"{r['measured_steps_per_s']:>10.0f} {r['measured_over_predicted']:>15.2f}")
        else:  # a reference row
            head = (f"{r['kind']}\n{'':<8} {'':>10} {r['measured_steps_per_s']:>10.0f} "
                    f"{'':>15}")
        lines.append(f"{head} {r['x_env_alone']:>12.2f} {r['share_of_w_alone']:>10.0%}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.model",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default=f"{__package__.rpartition('.')[0]}.envs:make_cartpole",
                   help="a gymnasium id or package.module:factory (one env, not a vector env)")
    p.add_argument("--env-kwargs", default=None, metavar="JSON")
    p.add_argument("-T", "--batch-T", type=int, default=128)
    p.add_argument("-B", "--batch-B", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                   help="timed seconds per measurement, over all rounds")
    p.add_argument("--start-method", default=None, choices=mp.get_all_start_methods())
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    env_kwargs = checked_common(p, args)
    if args.batch_T <= T_SHORT or args.batch_B < 2 or args.workers < 1:
        p.error(f"needs -T > {T_SHORT}, -B >= 2 and --workers >= 1")

    def measure(progress: Callable) -> dict:
        env_fn = resolve_env(args.env, env_kwargs)
        check_env(env_fn, args.env)
        return model(env_fn, batch_T=args.batch_T, batch_B=args.batch_B, workers=args.workers,
                     seconds=args.seconds, start_method=args.start_method, progress=progress)
    return print_report(p, args.json, _table, measure)


if __name__ == "__main__":
    sys.exit(main())
