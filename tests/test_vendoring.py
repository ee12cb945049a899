"""The package copied into a research repo under another name (``third_party/rlsampling``)
works as it does installed: every kind under fork, spawn and forkserver, and ``python -m``.
A stand-in ``sampling`` package that refuses to be imported sits first on the path, so a
single import by the original name (in the parent or in any worker) fails the test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ALL_METHODS

# A check of the package as a tool (vendoring, the peers script): tox runs it once.
pytestmark = pytest.mark.tooling
ROOT = Path(__file__).resolve().parents[1]
# A fresh interpreter per start method and kind imports numpy in every spawned worker.
RUN_TIMEOUT_S = 240

EVERY_KIND = """
import sys
from third_party import rlsampling
assert rlsampling.__file__.startswith(sys.argv[1]), rlsampling.__file__
for method in sys.argv[2].split(","):
    for kind in list(rlsampling.KINDS) + ["auto"]:
        agent = rlsampling.RandomAgent(rlsampling.CartPole().action_space)
        with rlsampling.make_sampler(kind, rlsampling.CartPole, agent, batch_T=4, batch_B=2,
                                     start_method=method, eval_n_envs=2,
                                     eval_max_steps=8) as s:
            assert s.obtain_samples().reward.shape == (4, 2)
            s.evaluate_agent()
        print(method, kind, flush=True)
"""


@pytest.fixture
def vendored(tmp_path) -> tuple:
    """``(folder, environment)``: the package copied to ``folder/third_party/rlsampling``,
    and an environment whose path finds it and, before any install, a ``sampling`` that
    raises on import."""
    shutil.copytree(ROOT / "sampling", tmp_path / "third_party" / "rlsampling",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "sampling").mkdir()
    (tmp_path / "sampling" / "__init__.py").write_text(
        "raise ImportError('the vendored copy imported the package by its original name')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return tmp_path, env


@pytest.mark.start_method_matters  # pickling by module name, the forkserver's imports
def test_the_vendored_copy_runs_every_kind_under_every_start_method(vendored):
    folder, env = vendored
    proc = subprocess.run(
        [sys.executable, "-c", EVERY_KIND, str(folder / "third_party" / "rlsampling"),
         ",".join(ALL_METHODS)], cwd=folder, env=env, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split("\n")) - 1 == len(ALL_METHODS) * (len(__import__(
        "sampling").KINDS) + 1), proc.stdout


def test_python_m_runs_the_vendored_benchmark_on_its_own_cartpole(vendored):
    folder, env = vendored
    proc = subprocess.run(
        [sys.executable, "-m", "third_party.rlsampling", "--kinds", "serial,cpu", "-T", "8",
         "-B", "2", "--seconds", "0.3", "--json", "-q"], cwd=folder, env=env,
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["env"] == "third_party.rlsampling.envs:make_cartpole"
    assert {r["kind"] for r in report["results"]} == {"serial", "cpu"}
    usage = subprocess.run([sys.executable, "-m", "third_party.rlsampling", "--help"],
                           cwd=folder, env=env, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S)
    assert usage.stdout.startswith("usage: python -m third_party.rlsampling"), usage.stdout


CORE_ONLY = """
import sys
import numpy as np
from third_party import rlsampling
from third_party.rlsampling.spaces import Box, Discrete


class Env:  # the user's own env: the built-in ones are gone from this copy
    observation_space, action_space = Box(-1, 1, (2,), np.float32), Discrete(2)

    def reset(self, *, seed=None, options=None):
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 1.0, False, False, {}


if __name__ == "__main__":
    for kind in rlsampling.KINDS:
        with rlsampling.make_sampler(kind, Env, lambda obs: np.zeros(len(obs), np.int64),
                                     batch_T=4, batch_B=2, start_method="spawn") as s:
            assert s.obtain_samples().reward.sum() == 8.0
    print("ok")
"""


def test_the_core_works_without_the_built_in_envs_and_the_benchmark(vendored):
    """envs.py and bench/ are optional: the core never imports them."""
    folder, env = vendored
    package = folder / "third_party" / "rlsampling"
    (package / "envs.py").unlink()
    shutil.rmtree(package / "bench")
    script = folder / "core_only.py"
    script.write_text(CORE_ONLY)
    proc = subprocess.run([sys.executable, str(script)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    gone = subprocess.run([sys.executable, "-m", "third_party.rlsampling"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert gone.returncode == 2 and "is not part of this copy" in gone.stderr, gone.stderr
