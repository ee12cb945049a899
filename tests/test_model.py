"""``python -m sampling.bench.model``: the cost model the speed figures are explained with.
Runs it as a user would, on the built-in CartPole, and checks that its parts add up."""
from __future__ import annotations

import json
import math
import subprocess

import pytest

from tests.helpers import run_module

# A check of the package as a tool: tox runs it once.
pytestmark = pytest.mark.tooling


def run_model(*args: str) -> subprocess.CompletedProcess:
    return run_module("sampling.bench.model", *args)


def test_model_components_add_up_to_its_prediction():
    proc = run_model("-T", "32", "-B", "4", "--workers", "2", "--seconds", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    c = rep["components_us"]
    assert set(c) == {"env alone", "B envs round-robin", "sampler per env step",
                      "sampler per batch step", "sampler per episode", "cpu per batch"}
    assert all(math.isfinite(v) for v in c.values())
    assert c["env alone"] > 0 and c["B envs round-robin"] > 0
    # CartPole under random actions: episodes of about 22 steps
    assert 10 < rep["mean_episode_length"] < 40
    serial, cpu, ref = rep["kinds"]
    assert (serial["kind"], cpu["kind"]) == ("serial", "cpu") and ref["kind"].startswith("cpu: 2")
    B, L = 4, rep["mean_episode_length"]
    per_env_step = (c["B envs round-robin"] + c["sampler per env step"]
                    + c["sampler per batch step"] / B + c["sampler per episode"] / L)
    assert serial["predicted_steps_per_s"] == pytest.approx(1e6 / per_env_step)
    for r in (serial, cpu):
        assert r["measured_over_predicted"] == pytest.approx(
            r["measured_steps_per_s"] / r["predicted_steps_per_s"])


def test_model_refuses_what_it_cannot_model():
    proc = run_model("-B", "5", "--workers", "2")
    assert proc.returncode == 2 and "-B 5 does not split evenly into 2 workers" in proc.stderr
    proc = run_model("--env", "sampling.envs:make_vector_cartpole")
    assert proc.returncode == 2 and "not a vector env" in proc.stderr
    proc = run_model("-T", "8")
    assert proc.returncode == 2 and "needs -T > 16" in proc.stderr
    for args, message in ((["--seconds", "nan"], "--seconds must be a positive number"),
                          (["--seconds", "-1"], "--seconds must be a positive number"),
                          (["--env-kwargs", "{bad"], "--env-kwargs is not valid JSON"),
                          (["--start-method", "bogus"], "invalid choice: 'bogus'")):
        proc = run_model(*args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
