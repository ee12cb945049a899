"""The benchmark's verdict and its table: spreads, ties, the recommendation, the text report.

Imports the core's :data:`~sampling.KINDS` only; pure functions of a report's figures.
"""
from __future__ import annotations

import json
import statistics
from typing import Sequence

from ..kinds import KINDS

__all__ = ["ALL_KINDS", "ROUNDS", "PREFERENCE", "spread", "pick_kind", "recommendation",
           "format_report"]

ALL_KINDS = tuple(KINDS)
ROUNDS = 9  # a rate is the median over this many interleaved timed chunks
# The recommendation's tie-break, simplest first (fewer processes, fewer per-step handoffs,
# easier to debug): the order auto's rule prefers too. When kinds tie with the fastest (see
# pick_kind), the first of them in this order is recommended.
PREFERENCE = ALL_KINDS
# A figure's spread: the quartiles of its per-round rates. With ROUNDS = 9 that is the 3rd and
# 7th of the sorted rounds: a burst of load elsewhere in one or two rounds does not widen it
# (min..max would, and would then call nearly everything a tie).
SPREAD_QUARTILES = 4  # statistics.quantiles(n=4) cuts at the 1st, 2nd and 3rd quartiles
# Other processes' average load (CPUs kept busy) from which the report notes it: below this,
# the machine was about idle apart from the benchmark.
NOTE_OTHER_LOAD_CPUS = 0.2


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


def recommendation(r: dict, pick: dict | None = None) -> str:
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
    """The human-readable table of a :func:`~sampling.bench.benchmark` report."""
    lines = _header(rep) + [
        "",
        f"{'kind':<23}{'workers':>8}{'steps/s':>10}{'x alone':>9}{'of ideal':>9}"
        f"{'of W alone':>11}  where the time goes (env / agent / other)",
    ]
    estimated = False
    for r in rep["results"]:
        line, est = _row(r)
        lines.append(line)
        estimated = estimated or est
    return "\n".join(lines + _notes(rep, estimated))


def _header(rep: dict) -> list:
    """The lines above the table: the setup, the references, the agent's cost."""
    alone, W = rep["env_alone_steps_per_s"], rep["workers"]
    n = rep.get("env_num_envs", 1)  # a vector env: units are env steps, n per step() call
    par = rep.get("parallel_env_alone_steps_per_s")
    lines = [
        f"env {rep.get('env', '?')}"
        + (f" {json.dumps(rep['env_kwargs'])}" if rep.get("env_kwargs") else "")
        + f", agent {rep.get('agent', '?')}"
        + (f" (torch threads {rep['torch_threads']})" if rep.get("torch_threads") else "")
        + f", T={rep['batch_T']}, B={rep['batch_B']}, {W} workers, {rep['usable_cpus']} "
        f"usable CPUs, start method {rep['start_method']}, {rep['seconds_per_kind']:g} s per kind",
        (f"env alone (one env, one process): {alone:,.0f} steps/s ({1e6 / alone:.3g} us/step)"
         if n == 1 else
         f"vector env alone (one vector env of {n}, one process): {alone:,.0f} env steps/s "
         f"({n * 1e6 / alone:.3g} us per step of all {n})")
        + (f"; env.step in the serial sampler: {rep['env_step_us_in_serial']:.3g} us"
           + (" per env step" if n > 1 else "") if rep.get("env_step_us_in_serial") else ""),
    ]
    if W > 1 and par:
        lines.append(f"{W} {'envs' if n == 1 else 'vector envs'} alone, {W} processes at once: "
                     f"{par:,.0f} steps/s ({par / alone:.2f}x one)")
        slow = rep.get("parallel_env_alone_slowest_steps_per_s")
        if slow:
            lines.append(f"  the slowest of them: {slow:,.0f} steps/s; {W} x that = "
                         f"{W * slow / alone:.2f}x one, the most a kind that waits for every "
                         f"worker can reach")
    lines.append("agent: " + ", ".join(f"{us:.3g} us per call on {n} envs"
                                       for n, us in rep["agent_us_per_call"].items()))
    return lines


def _row(r: dict) -> tuple:
    """(the table's line for one kind's result, whether it holds an estimate)."""
    if "skipped" in r:
        return f"{r['kind']:<23}{r['workers'] or '-':>8}  skipped: {r['skipped']}", False
    b = r["breakdown"]
    env = ("~" if b["env_estimated"] else "") + f"{b['env']:.0%}"
    agent = ("~" if b["agent_estimated"] else "") + f"{b['agent']:.0%}"
    other = "overlapped" if b["overlapped"] else f"{b['other']:.0%}"
    where = f"{env} / {agent} / {other}"
    if "handoff_us" in r:
        where += f"; handoff {r['handoff_us']:.0f} us/step"
    of_w = r.get("share_of_parallel_env_alone")
    line = (f"{r['kind']:<23}{r['workers'] or '-':>8}{r['steps_per_s']:>10,.0f}"
            f"{r['ratio_to_env_alone']:>8.2f}x{r['share_of_ideal']:>9.0%}"
            f"{'-' if of_w is None else format(of_w, '.0%'):>11}  {where}")
    return line, bool(b["env_estimated"] or b["agent_estimated"])


def _notes(rep: dict, estimated: bool) -> list:
    """The lines below the table: what the columns mean, and the recommendation."""
    lines = [
        "",
        "x alone: steps/s over the env alone. of ideal: over the env alone x min(workers,",
        "  usable CPUs) (x 1 for serial). of W alone: over W envs stepping alone in W",
        "  processes at once, measured in the same rounds (what the machine gives W workers",
        "  now). env / agent / other: shares of the wall time of the process on the critical",
        "  path; other = sampler bookkeeping, waiting, handoffs, CPU contention.",
    ]
    if estimated:
        lines.append("~ = estimated: a worker's env time as its envs x the env-alone step time; "
                     "cpu's agent\n  time from timing the agent alone in the parent on one "
                     "worker's envs (warm caches:\n  a lower bound; compare serial's measured "
                     "agent share).")
    if any("handoff_us" in r for r in rep["results"]):
        lines.append("handoff: wall time per batch step with a no-op env and agent, one env per "
                     "worker\n  (the action server's round trip, bookkeeping included).")
    if rep.get("other_load_cpus") is not None and rep["other_load_cpus"] >= NOTE_OTHER_LOAD_CPUS:
        lines.append(f"note: other processes kept {rep['other_load_cpus']:.1f} CPUs busy on "
                     f"average during the run;\n  they compete with the sampler and lower "
                     f"the parallel kinds' figures.")
    lines.append(f"recommendation: {rep['recommendation']}")
    return lines
