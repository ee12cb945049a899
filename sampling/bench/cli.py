"""The command line of the benchmark (``python -m sampling``): argparse and :func:`main`.

Imports the rest of :mod:`sampling.bench`. Results go to stdout (a table, or one JSON object
with ``--json``); progress and errors go to stderr. Exit status: 0, 2 for bad arguments, 1
when a sampler fails during the run, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys

from ..errors import SamplerError
from .inputs import BenchError, check_env, checked_common, env_width, make_agent, resolve_env
from .lag import format_lag_report, lag_benchmark
from .measure import DEFAULT_SECONDS, benchmark
from .report import ALL_KINDS, format_report

__all__ = ["main", "DEFAULT_ENV"]

# The package's own name, as imported (a vendored copy may be third_party.rlsampling).
PACKAGE = __package__.rpartition(".")[0]
PROG = f"python -m {PACKAGE}"
DEFAULT_ENV = f"{PACKAGE}.envs:make_cartpole"
EXIT_FAILED, EXIT_INTERRUPTED = 1, 130  # (2, bad arguments, is argparse's own)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run each sampler kind on an env for a few seconds, compare it with the "
                    "env alone, and recommend a kind.")
    p.add_argument("--env", default=DEFAULT_ENV, metavar="ID_OR_FACTORY",
                   help="a gymnasium id (e.g. CartPole-v1; needs gymnasium) or "
                        "package.module:factory returning a gymnasium-API env "
                        f"(default: {DEFAULT_ENV}, the built-in numpy CartPole)")
    p.add_argument("--env-kwargs", default=None, metavar="JSON",
                   help='keyword arguments for the factory or gymnasium.make, as a JSON '
                        'object, e.g. \'{"step_cost_us": 150}\'')
    p.add_argument("--agent", default="random", choices=("random", "mlp"),
                   help="random: uniform random actions (measures the sampler); mlp: a "
                        "2x64 torch MLP policy (needs torch)")
    p.add_argument("-T", "--batch-T", type=int, default=128, metavar="T",
                   help="time steps per batch (128)")
    p.add_argument("-B", "--batch-B", type=int, default=16, metavar="B", help="envs per batch (16)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: min(B, usable CPUs); the alternating "
                        "kinds round down to an even count)")
    p.add_argument("--kinds", default=",".join(ALL_KINDS), metavar="K1,K2",
                   help=f"comma-separated kinds to measure (default: all: {','.join(ALL_KINDS)})")
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                   help="timed seconds per kind and per reference (the env alone, W envs "
                        "alone, serial with env.step timed); default 3, so a full run takes "
                        "about half a minute")
    p.add_argument("--start-method", default=None, choices=mp.get_all_start_methods(),
                   help="multiprocessing start method (default: the platform's)")
    p.add_argument("--torch-threads", type=int, default=1, metavar="N",
                   help="torch threads of this (the parent) process with --agent mlp; workers "
                        "always use 1 (default 1: more threads of a small MLP only contend "
                        "with the workers for the CPUs)")
    p.add_argument("--policy-lag", action="store_true",
                   help="instead: time a training loop whose update waits as long as one "
                        "batch's collection (a GPU learner), with and without policy_lag=1, "
                        "per kind")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple:
    """The kinds and the env kwargs the arguments ask for; a parser error if they are bad."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        parser.error(f"--kinds: unknown kind(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                     f"valid kinds: {', '.join(ALL_KINDS)}")
    for name, v, lo in (("-T", args.batch_T, 1), ("-B", args.batch_B, 1),
                        ("--workers", args.workers, 1), ("--torch-threads", args.torch_threads, 1)):
        if v is not None and v < lo:
            parser.error(f"{name} must be >= {lo}, got {v}")
    return kinds, checked_common(parser, args)


def main(argv: list | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    kinds, env_kwargs = _check(parser, args)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        env_fn = resolve_env(args.env, env_kwargs)
        spaces = check_env(env_fn, args.env)
        width = env_width(env_fn, args.env)
        agent = make_agent(args.agent, spaces)
    except BenchError as e:
        parser.error(str(e))
    if args.batch_B % width:
        parser.error(f"-B {args.batch_B} is not a multiple of the vector env's num_envs="
                     f"{width}: each fills {width} columns of the batch (e.g. -B {2 * width})")
    if args.agent == "mlp":
        import torch
        torch.set_num_threads(args.torch_threads)
    try:
        if args.policy_lag:
            rep = lag_benchmark(env_fn, agent, kinds=kinds, batch_T=args.batch_T,
                                batch_B=args.batch_B, n_workers=args.workers,
                                seconds=args.seconds, start_method=args.start_method,
                                progress=progress)
        else:
            rep = benchmark(env_fn, agent, batch_T=args.batch_T, batch_B=args.batch_B,
                            n_workers=args.workers, kinds=kinds, seconds=args.seconds,
                            start_method=args.start_method, progress=progress, spaces=spaces,
                            width=width)
    except (SamplerError, BenchError) as e:
        print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    rep = {"env": args.env, "env_kwargs": env_kwargs, "agent": args.agent,
           "torch_threads": args.torch_threads if args.agent == "mlp" else None, **rep}
    table = format_lag_report if args.policy_lag else format_report
    print(json.dumps(rep, indent=1) if args.json else table(rep))
    if not args.policy_lag and rep["best"] is None:
        print(f"{PROG}: error: no kind could run (see the table)", file=sys.stderr)
        return EXIT_FAILED
    return 0
