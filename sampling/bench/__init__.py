"""The benchmark (``python -m sampling``): measure every kind on one env and agent, recommend one.

An optional subpackage: the core never imports it, and a vendored copy of ``sampling``
works without it. It imports the core's modules (make_sampler, and the pool, probes and
checks it times the references with: :mod:`.measure`'s imports list them); torch and
gymnasium only when asked for (``--agent mlp``, a gymnasium env id). Modules: :mod:`.inputs`
(env and agent from command-line strings), :mod:`.mlp` (the torch agent), :mod:`.measure`
(the timed rounds), :mod:`.report` (the verdict and the table), :mod:`.lag` (a training loop
with and without ``policy_lag``), :mod:`.cli` (argparse and ``main``), :mod:`.peers` (the
library side by side with its peers: ``python -m sampling.bench.peers``), :mod:`.model`
(where serial's and cpu's time goes, as a model: ``python -m sampling.bench.model``),
:mod:`.versus` (this package against another copy of it: ``python -m sampling.bench.versus``).
"""
from __future__ import annotations

from typing import Any

from .inputs import BenchError, check_env, make_agent, resolve_env
from .lag import format_lag_report, lag_benchmark
from .measure import benchmark, env_alone, handoff_us
from .report import (
    ALL_KINDS,
    PREFERENCE,
    ROUNDS,
    format_report,
    pick_kind,
    recommendation,
    spread,
)

__all__ = ["benchmark", "env_alone", "handoff_us", "format_report", "pick_kind", "spread",
           "recommendation", "ROUNDS", "PREFERENCE", "ALL_KINDS", "MLPAgent", "make_agent",
           "resolve_env", "check_env", "BenchError", "lag_benchmark", "format_lag_report"]


def __getattr__(name: str) -> Any:
    # MLPAgent subclasses the torch adapter: import torch only when it is asked for.
    if name == "MLPAgent":
        from .inputs import import_torch
        import_torch()
        from .mlp import MLPAgent
        return MLPAgent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
