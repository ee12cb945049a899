"""``python -m sampling.bench.versus OTHER``: this package against another copy of it (an
earlier commit, say), the same kinds on the same env, in one process and interleaved rounds.

``OTHER`` is the directory of the other copy, under a name of its own (the package runs
under any name: see docs/vendoring.md), e.g.::

    mkdir /tmp/base && git archive <commit> sampling | tar -x -C /tmp/base
    mv /tmp/base/sampling /tmp/base/sampling_base
    python -m sampling.bench.versus /tmp/base/sampling_base --env CartPole-v1 --kinds serial,cpu

In ``--env``, ``{pkg}`` stands for each copy's name, so that an env that ships with the
package is each copy's own (``--env '{pkg}.envs:make_vector_cartpole'``). Reported: each
copy's rate per kind (median over the rounds) and the median of the per-round ratios, which
a burst of load hits on both sides alike.
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from .inputs import (
    BenchError,
    check_env,
    checked_common,
    make_agent,
    print_report,
    resolve_env,
)
from .measure import _rounds, _sampler_chunks
from .report import ALL_KINDS, ROUNDS

__all__ = ["versus", "main"]


def _load(path: str) -> Any:
    """The package in directory ``path``, imported under its directory's name."""
    where = Path(path).resolve()
    if not (where / "__init__.py").is_file():
        raise BenchError(f"{path!r} is not a package directory (no __init__.py)")
    if where.name == __package__.rpartition(".")[0]:
        raise BenchError(f"{path!r} has this package's name, {where.name!r}: copy it under "
                         f"another name (e.g. {where.name}_base) so that both can be imported")
    sys.path.insert(0, str(where.parent))
    return importlib.import_module(where.name)


def versus(other: Any, env: str, env_kwargs: dict, kinds: list, *, agent: str = "random",
           batch_T: int = 128, batch_B: int = 16, workers: int = 2, seconds: float = 3.0,
           start_method: str | None = None, progress: Callable = lambda msg: None) -> dict:
    """Rates of ``kinds`` in this package and in ``other``; see the module docstring."""
    this = importlib.import_module(__package__.rpartition(".")[0])
    with ExitStack() as stack:
        chunks = {}
        for kind in kinds:
            for side, pkg in (("this", this), ("other", other)):
                env_fn = resolve_env(env.replace("{pkg}", pkg.__name__), env_kwargs)
                spaces = check_env(env_fn, env)
                # each copy's own RandomAgent (it may have changed too); the MLP is the same
                policy = (pkg.RandomAgent(spaces[1]) if agent == "random"
                          else make_agent(agent, spaces))
                s = stack.enter_context(pkg.make_sampler(
                    kind, env_fn, policy, batch_T=batch_T, batch_B=batch_B,
                    n_workers=None if kind == "serial" else workers,
                    start_method=start_method))
                s.obtain_samples(0)
                chunks[(kind, side)] = _sampler_chunks(s)
        named = {f"{kind} ({side})": chunk for (kind, side), chunk in chunks.items()}
        rates, _, _ = _rounds(named, seconds, workers, progress)
    rows = []
    for kind in kinds:
        mine, theirs = rates[f"{kind} (this)"], rates[f"{kind} (other)"]
        ratios = [a / b for a, b in zip(mine, theirs)]
        rows.append({"kind": kind, "this_steps_per_s": statistics.median(mine),
                     "other_steps_per_s": statistics.median(theirs),
                     "ratio_median": statistics.median(ratios),
                     "ratio_range": [min(ratios), max(ratios)]})
    return {"other": other.__name__, "env": env, "agent": agent, "batch_T": batch_T,
            "batch_B": batch_B, "workers": workers, "rounds": ROUNDS, "results": rows}


def _table(rep: dict) -> str:
    lines = [f"this package against {rep['other']}: env {rep['env']}, agent {rep['agent']}, "
             f"T={rep['batch_T']}, B={rep['batch_B']}, {rep['workers']} workers, "
             f"{rep['rounds']} interleaved rounds",
             f"{'kind':<24} {'this':>10} {'other':>10} {'this/other':>11} {'range':>13}"]
    for r in rep["results"]:
        lo, hi = r["ratio_range"]
        lines.append(f"{r['kind']:<24} {r['this_steps_per_s']:>10.0f} "
                     f"{r['other_steps_per_s']:>10.0f} {r['ratio_median']:>11.3f} "
                     f"{lo:>6.2f}..{hi:<5.2f}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.versus",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("other", help="directory of the other copy of the package (its own name)")
    p.add_argument("--env", default="{pkg}.envs:make_cartpole",
                   help="a gymnasium id or package.module:factory; {pkg} is each copy's name")
    p.add_argument("--env-kwargs", default=None, metavar="JSON")
    p.add_argument("--agent", choices=("random", "mlp"), default="random")
    p.add_argument("--kinds", default="serial,cpu")
    p.add_argument("-T", "--batch-T", type=int, default=128)
    p.add_argument("-B", "--batch-B", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0,
                   help="timed seconds per kind and copy, over all rounds")
    p.add_argument("--start-method", default=None, choices=mp.get_all_start_methods())
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    env_kwargs = checked_common(p, args)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(ALL_KINDS):
        p.error(f"--kinds: one or more of {', '.join(ALL_KINDS)}, got {args.kinds!r}")
    if min(args.batch_T, args.batch_B, args.workers) < 1:
        p.error("-T, -B and --workers must be >= 1")
    return print_report(p, args.json, _table, lambda progress: versus(
        _load(args.other), args.env, env_kwargs, kinds, agent=args.agent, batch_T=args.batch_T,
        batch_B=args.batch_B, workers=args.workers, seconds=args.seconds,
        start_method=args.start_method, progress=progress))


if __name__ == "__main__":
    sys.exit(main())
