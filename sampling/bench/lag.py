"""``python -m sampling --policy-lag``: a training loop with and without ``policy_lag=1``.

Imports the public core and the report's spread. The loop is ``batch = next(steps);
update(batch)``, where the update *waits* (``time.sleep``) as long as collecting one
batch takes with that kind: a GPU learner, whose work does not take the CPUs from the
sampler. Without the lag the loop takes collect + update per batch; with it, the next
batch is collected during the update, so at best max(collect, update).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

from ..api import make_sampler
from .report import ROUNDS, spread

__all__ = ["lag_benchmark", "format_lag_report", "UPDATE_BATCHES"]

UPDATE_BATCHES = 5  # batches timed (after one warm-up) to set the update's duration


def _loop_chunk(sampler: Any, update_s: float) -> Callable[[float], tuple]:
    """A chunk runner of the training loop; returns (env steps, seconds)."""
    steps = sampler.steps()
    per_batch = sampler.batch_T * sampler.batch_B

    def chunk(target: float) -> tuple:
        n, t0 = 0, time.perf_counter()
        while True:
            next(steps)
            time.sleep(update_s)  # the learner: waits, leaving the CPUs to the sampler
            n += 1
            dt = time.perf_counter() - t0
            if dt >= target:
                return n * per_batch, dt

    return chunk


def _collect_s(sampler: Any) -> float:
    """Median seconds to collect one batch, synchronously."""
    sampler.obtain_samples(0)  # warm-up
    times = []
    for i in range(UPDATE_BATCHES):
        t0 = time.perf_counter()
        sampler.obtain_samples(i + 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lag_benchmark(env_fn: Callable, agent: Any, *, kinds: Sequence[str], batch_T: int,
                  batch_B: int, n_workers: int | None, seconds: float,
                  start_method: str | None, progress: Callable[[str], None]) -> dict:
    """Per kind: the loop's env steps/s without and with ``policy_lag=1``, in ``ROUNDS``
    interleaved rounds (each round one chunk of each), and their ratio."""
    results = []
    for kind in kinds:
        progress(f"{kind}: timing the collection of one batch...")
        kw = dict(batch_T=batch_T, batch_B=batch_B, start_method=start_method,
                  n_workers=n_workers if kind != "serial" else None)
        try:
            with make_sampler(kind, env_fn, agent, **kw) as sync, \
                    make_sampler(kind, env_fn, agent, policy_lag=1, **kw) as lagged:
                update_s = _collect_s(sync)
                chunks = {"sync": _loop_chunk(sync, update_s),
                          "lagged": _loop_chunk(lagged, update_s)}
                next(lagged.steps())  # its first call collects two batches: not timed
                rates: dict = {name: [] for name in chunks}
                for rnd in range(ROUNDS):
                    progress(f"{kind}: round {rnd + 1}/{ROUNDS}...")
                    for name in (("sync", "lagged") if rnd % 2 == 0 else ("lagged", "sync")):
                        units, dt = chunks[name](seconds / ROUNDS)
                        rates[name].append(units / dt)
                workers = sync.n_workers
        except (ValueError, TypeError) as e:  # e.g. batch_B not splittable in two groups
            results.append({"kind": kind, "skipped": str(e)})
            continue
        sync_rate, lag_rate = (statistics.median(rates[k]) for k in ("sync", "lagged"))
        results.append({"kind": kind, "workers": workers, "update_ms": update_s * 1e3,
                        "sync_steps_per_s": sync_rate, "lagged_steps_per_s": lag_rate,
                        "speedup": lag_rate / sync_rate,
                        "sync_iqr": list(spread(rates["sync"])),
                        "lagged_iqr": list(spread(rates["lagged"]))})
    return {"batch_T": batch_T, "batch_B": batch_B, "seconds_per_kind": seconds,
            "policy_lag_results": results}


def format_lag_report(rep: dict) -> str:
    """The table ``python -m sampling --policy-lag`` prints."""
    lines = [f"env {rep.get('env', '?')}, agent {rep.get('agent', '?')}, T={rep['batch_T']}, "
             f"B={rep['batch_B']}, {rep['seconds_per_kind']:g} s per kind and loop",
             "training loop: next(steps), then an update that waits as long as collecting "
             "one batch takes (a GPU learner)", "",
             f"{'kind':<23}{'workers':>8}{'update ms':>10}{'steps/s':>11}"
             f"{'policy_lag=1':>14}{'speedup':>9}"]
    for r in rep["policy_lag_results"]:
        if "skipped" in r:
            lines.append(f"{r['kind']:<23}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['kind']:<23}{r['workers'] or '-':>8}{r['update_ms']:>10.1f}"
                     f"{r['sync_steps_per_s']:>11,.0f}{r['lagged_steps_per_s']:>14,.0f}"
                     f"{r['speedup']:>8.2f}x")
    lines += ["", "steps/s: env steps per second of the whole loop, collection and update. "
              "speedup: with policy_lag=1\n  over without; at best 2x when the update takes "
              "as long as a batch (serial cannot overlap: 1x)."]
    return "\n".join(lines)
