"""``python -m sampling.bench.peers``: the side-by-side script the docs' figures come from
runs, puts every contestant in every round, and reports ratios against both references."""
from __future__ import annotations

import json

import pytest

from tests.helpers import run_module

pytest.importorskip("gymnasium")
# A check of the package as a tool (vendoring, the peers script): tox runs it once.
pytestmark = pytest.mark.tooling


def test_peers_reports_every_contestant_against_both_references():
    proc = run_module("sampling.bench.peers", "--env", "CartPole-v1", "-B", "4", "--workers",
                      "2", "--kinds", "serial", "--seconds", "0.3", "--json",
                      "--vector-env", "sampling.envs:make_vector_cartpole")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    rows = {r["name"]: r for r in rep["results"]}
    assert {"env alone", "2 envs alone", "sampling make_vector_env", "gymnasium SyncVectorEnv",
            "gymnasium AsyncVectorEnv", "sampling serial", "sampling serial, 1x4 vector"} \
        <= set(rows)
    assert rows["env alone"]["x_env_alone"] == 1.0
    assert rows["2 envs alone"]["share_of_w_alone"] == 1.0
    for r in rows.values():
        assert r["steps_per_s"] > 0 and r["steps_per_s_iqr"][0] <= r["steps_per_s_iqr"][1]


CARTPOLE, VECTOR = "sampling.envs:make_cartpole", "sampling.envs:make_vector_cartpole"


@pytest.mark.parametrize("args, message", [
    (["-B", "5", "--kinds", "cpu", "--vector-env", VECTOR],
     "-B 5 does not split into 2 vector envs"),
    (["--vector-env", VECTOR], "--vector-env runs the sampler kinds on a vector env: name "
                               "them with --kinds"),
    (["--kinds", "serial", "--vector-env", "no.such:fn"],
     "--vector-env 'no.such:fn': cannot import module 'no.such'"),
    (["--kinds", "serial", "--vector-env", CARTPOLE],
     "--vector-env 'sampling.envs:make_cartpole': making the env failed: TypeError"),
    (["--kinds", "serial", "--vector-env", "sampling.envs:CartPole"],
     "making the env failed"),
    (["--seconds", "nan"], "--seconds must be a positive number"),
    (["--env-kwargs", "[1, 2]"], "--env-kwargs must be a JSON object"),
    (["--start-method", "bogus"], "invalid choice: 'bogus'"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, message):
    proc = run_module("sampling.bench.peers", "--env", CARTPOLE, "-B", "4", "--workers", "2",
                      "--seconds", "0.1", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
