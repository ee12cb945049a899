"""``python -m sampling.bench.versus``: this package against another copy of it, as the
closing notes' before/after figures were measured. Runs it as a user would."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_module

# A check of the package as a tool: tox runs it once.
pytestmark = pytest.mark.tooling


def run_versus(*args: str) -> subprocess.CompletedProcess:
    return run_module("sampling.bench.versus", *args)


def copy_package(dst: Path) -> Path:
    shutil.copytree(ROOT / "sampling", dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_versus_a_copy_reports_both_rates_per_kind(tmp_path):
    base = copy_package(tmp_path / "sampling_base")
    proc = run_versus(str(base), "--env", "{pkg}.envs:make_vector_cartpole", "--env-kwargs",
                      '{"num_envs": 2}', "--kinds", "serial,cpu", "-T", "8", "-B", "4",
                      "--seconds", "0.3", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["other"] == "sampling_base" and [r["kind"] for r in rep["results"]] == ["serial",
                                                                                       "cpu"]
    for r in rep["results"]:
        assert r["this_steps_per_s"] > 0 and r["other_steps_per_s"] > 0
        lo, hi = r["ratio_range"]
        assert lo <= r["ratio_median"] <= hi


@pytest.mark.parametrize("setup, args, message", [
    ("empty", [], "is not a package directory"),
    ("same name", [], "has this package's name, 'sampling'"),
    ("copy", ["--kinds", "serial,warp"], "--kinds: one or more of serial, cpu"),
    ("copy", ["--seconds", "0"], "--seconds must be a positive number"),
])
def test_versus_refuses_what_it_cannot_compare(tmp_path, setup, args, message):
    other = {"empty": lambda: tmp_path,
             "same name": lambda: copy_package(tmp_path / "sampling"),
             "copy": lambda: copy_package(tmp_path / "sampling_base")}[setup]()
    proc = run_versus(str(other), *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
