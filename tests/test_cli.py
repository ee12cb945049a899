"""``python -m sampling`` (the benchmark CLI) and ``make_sampler("auto")``: behaviour, not speed."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import sampling
from sampling import auto, bench
from sampling.agents import RandomAgent
from sampling.envs import make_cartpole
from tests.helpers import CountingEnv

# The benchmark is a tool: its checks run once (tox: py313), its torch agent in the torch env.
pytestmark = pytest.mark.tooling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--seconds", "0.2", "-T", "8", "-B", "4", "--workers", "2"]


def run_cli(*args, pre: str = "", timeout: float = 60):
    """Run the CLI in a subprocess; ``pre`` is Python run first (e.g. to hide torch)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = pre + "import sys; from sampling.__main__ import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def run_json(*args, **kw) -> dict:
    p = run_cli(*TINY, "--json", *args, **kw)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # stdout holds the JSON object and nothing else


# -- the table and the JSON ------------------------------------------------------------------
def test_table_lists_the_chosen_kinds_and_progress_goes_to_stderr():
    p = run_cli(*TINY, "--kinds", "serial,cpu")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "env alone" in out and "steps/s" in out
    rows = [line.split()[0] for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in bench.ALL_KINDS]
    assert rows == ["serial", "cpu"]
    assert out.strip().splitlines()[-1].startswith("recommendation: ")
    assert "measuring" not in out
    assert "starting cpu (2 workers)..." in p.stderr
    assert f"round 1/{bench.ROUNDS}: measuring" in p.stderr and "the env alone" in p.stderr


def test_quiet_prints_no_progress():
    p = run_cli(*TINY, "--kinds", "serial", "-q")
    assert p.returncode == 0, p.stderr
    assert "measuring" not in p.stderr


def test_json_report_structure():
    rep = run_json("--kinds", "serial,cpu,gpu")
    assert rep["env"] == "sampling.envs:make_cartpole" and rep["agent"] == "random"
    assert (rep["batch_T"], rep["batch_B"], rep["workers"]) == (8, 4, 2)
    assert rep["env_alone_steps_per_s"] > 0
    # the slowest of the W processes stepping alone is at most their mean
    assert 0 < rep["parallel_env_alone_slowest_steps_per_s"] <= (
        rep["parallel_env_alone_steps_per_s"] / rep["workers"] * (1 + 1e-9))
    assert [r["kind"] for r in rep["results"]] == ["serial", "cpu", "gpu"]
    for r in rep["results"]:
        assert r["steps_per_s"] > 0
        assert r["ratio_to_env_alone"] == pytest.approx(
            r["steps_per_s"] / rep["env_alone_steps_per_s"])
        ideal = 1 if r["kind"] == "serial" else min(2, rep["usable_cpus"])
        assert r["share_of_ideal"] == pytest.approx(r["ratio_to_env_alone"] / ideal)
        assert set(r["breakdown"]) >= {"env", "agent", "other"}
        assert r["workers"] == (0 if r["kind"] == "serial" else 2)
    by_kind = {r["kind"]: r for r in rep["results"]}
    assert by_kind["gpu"]["handoff_us"] > 0
    assert "handoff_us" not in by_kind["cpu"]
    assert by_kind["serial"]["breakdown"]["env_estimated"] is False
    for r in rep["results"]:  # the figure is the median of the rounds, its spread their IQR
        assert len(r["steps_per_s_rounds"]) == bench.ROUNDS
        assert r["steps_per_s"] == pytest.approx(np.median(r["steps_per_s_rounds"]))
        q1, q3 = r["steps_per_s_iqr"]
        assert min(r["steps_per_s_rounds"]) <= q1 <= r["steps_per_s"] <= q3
    assert rep["fastest"] == max(rep["results"], key=lambda r: r["steps_per_s"])["kind"]
    assert {"best": rep["best"], "fastest": rep["fastest"], "tied_with": rep["tied_with"]} == \
        bench.pick_kind({r["kind"]: r["steps_per_s_rounds"] for r in rep["results"]})
    assert rep["recommendation"].startswith(rep["best"] + ": ")
    assert ("Tie: " in rep["recommendation"]) == bool(rep["tied_with"])


def test_alternating_kinds_round_workers_to_even_and_report_handoff():
    rep = run_json("--kinds", "alternating,no_overlap_alternating", "--workers", "3")
    assert [r["workers"] for r in rep["results"]] == [2, 2]
    assert all(r["handoff_us"] > 0 for r in rep["results"])


def test_unsplittable_batch_is_reported_as_skipped():
    rep = run_json("--kinds", "serial,alternating", "-B", "3")
    alt = rep["results"][1]
    assert alt["kind"] == "alternating" and "two equal groups" in alt["skipped"]
    assert rep["best"] == "serial"


def test_spawn_start_method():
    rep = run_json("--kinds", "cpu", "--start-method", "spawn")
    assert rep["start_method"] == "spawn" and rep["results"][0]["steps_per_s"] > 0


# -- the recommendation when kinds tie ---------------------------------------------------------
# Synthetic per-round rates (steps/s over the ROUNDS interleaved rounds): no timing here.
SERIAL = [96, 98, 99, 100, 100, 101, 102, 103, 104]    # IQR 99..102
CPU = [97, 99, 100, 101, 101.5, 102, 103, 104, 106]    # median 1.5% above serial's: IQR 100..103
GPU = [60, 61, 62, 62, 63, 63, 64, 65, 66]
CLEAR = [150, 152, 154, 155, 156, 157, 158, 160, 162]  # IQR 154..158: far above SERIAL


def test_kinds_within_the_rounds_spread_tie_and_the_simplest_is_picked():
    pick = bench.pick_kind({"cpu": CPU, "serial": SERIAL, "gpu": GPU})
    assert pick == {"best": "serial", "fastest": "cpu", "tied_with": ["cpu"]}
    # Noise swaps the two medians in the next run: the same pick, the same tie.
    swapped = bench.pick_kind({"cpu": SERIAL, "serial": CPU, "gpu": GPU})
    assert swapped == {"best": "serial", "fastest": "serial", "tied_with": ["cpu"]}
    # The order is the preference order, not the order the kinds came in.
    assert bench.pick_kind({"alternating": CPU, "gpu": SERIAL})["best"] == "gpu"
    assert bench.pick_kind({"no_overlap_alternating": SERIAL, "alternating": CPU,
                            "gpu": SERIAL})["tied_with"] == ["alternating",
                                                             "no_overlap_alternating"]


def test_a_clear_winner_is_picked_and_one_outlier_round_makes_no_tie():
    assert bench.pick_kind({"serial": SERIAL, "cpu": CLEAR}) == {
        "best": "cpu", "fastest": "cpu", "tied_with": []}
    # A burst of load in one round spreads min..max over the winner's range, not the IQR.
    bursty = sorted(SERIAL[:-1] + [max(CLEAR) + 1])
    assert bench.pick_kind({"serial": bursty, "cpu": CLEAR})["tied_with"] == []
    # Spreads that only touch still tie: the third quartile meets the fastest's first.
    touching = [q + 52 for q in SERIAL]  # IQR 151..154; CLEAR's starts at 154
    assert bench.spread(touching)[1] == bench.spread(CLEAR)[0]
    assert bench.pick_kind({"gpu": CLEAR, "serial": touching})["best"] == "serial"


def test_the_recommendation_says_which_kinds_tie_and_why_the_pick():
    def result(kind, workers):
        return {"kind": kind, "workers": workers, "ratio_to_env_alone": 0.99,
                "share_of_ideal": 0.99, "breakdown": {"env": 0.97, "agent": 0.0, "other": 0.03}}

    pick = bench.pick_kind({"cpu": CPU, "serial": SERIAL, "gpu": GPU})
    text = bench.recommendation(result("serial", 0), pick)
    assert text.startswith("serial: 0.99x the env alone")
    assert "Tie: cpu measured fastest, but serial is within the rounds' spread of it" in text
    assert "picked the simplest, by the order " + " < ".join(bench.PREFERENCE) in text
    clear = bench.pick_kind({"serial": SERIAL, "cpu": CLEAR})
    assert "Tie" not in bench.recommendation(result("cpu", 2), clear)
    assert "\n" not in text  # the table's last line starts with "recommendation: "


# -- --env -----------------------------------------------------------------------------------
def test_env_factory_with_kwargs():
    rep = run_json("--kinds", "serial", "--env", "sampling.envs:make_cartpole",
                   "--env-kwargs", '{"max_episode_steps": 20, "step_cost_us": 5}')
    assert rep["env_kwargs"] == {"max_episode_steps": 20, "step_cost_us": 5}
    # 5 us of burnt CPU per step bounds the env-alone rate.
    assert rep["env_alone_steps_per_s"] < 1e6 / 5


def test_gymnasium_id():
    pytest.importorskip("gymnasium")
    rep = run_json("--kinds", "serial,cpu", "--env", "CartPole-v1")
    assert rep["env"] == "CartPole-v1" and len(rep["results"]) == 2


@pytest.mark.parametrize("args, match", [
    (["--env", "no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
    (["--env", "sampling.envs:no_such_factory"],
     "module 'sampling.envs' has no callable 'no_such_factory'"),
    (["--env", "sampling.envs:make_cartpole", "--env-kwargs", '{"bogus": 1}'],
     "making the env failed: TypeError"),
    (["--env", "sampling.envs:CartPole", "--env-kwargs", "[1, 2]"], "must be a JSON object"),
    (["--env-kwargs", "{oops"], "not valid JSON"),
    (["--env", "sampling.envs:Box"], "making the env failed"),
    (["--kinds", "serial,warp"], "unknown kind.*'warp'.*valid kinds: serial, cpu"),
    (["--kinds", "auto"], "unknown kind.*'auto'"),
    (["-B", "0"], "-B must be >= 1"),
    (["--seconds", "0"], "--seconds must be a positive number"),
    (["--seconds", "nan"], "--seconds must be a positive number"),
    (["--seconds", "inf"], "--seconds must be a positive number"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, match):
    import re
    p = run_cli(*TINY, *args)
    assert p.returncode == 2
    assert p.stdout == ""
    assert re.search(match, p.stderr), p.stderr


def test_unknown_gymnasium_id_suggests_close_ones():
    pytest.importorskip("gymnasium")
    p = run_cli(*TINY, "--env", "CartPole-v9")
    assert p.returncode == 2 and "no such gymnasium env id" in p.stderr
    assert "CartPole-v1" in p.stderr


def test_gymnasium_id_without_gymnasium():
    p = run_cli(*TINY, "--env", "CartPole-v1", pre="import sys; sys.modules['gymnasium'] = None; ")
    assert p.returncode == 2 and "gymnasium is not installed" in p.stderr


# -- --agent ---------------------------------------------------------------------------------
def test_mlp_agent():
    pytest.importorskip("torch")
    rep = run_json("--kinds", "serial,cpu,gpu", "--agent", "mlp")
    assert rep["agent"] == "mlp" and rep["torch_threads"] == 1
    assert all(r["steps_per_s"] > 0 for r in rep["results"])


def test_mlp_agent_without_torch_is_a_clear_error():
    p = run_cli(*TINY, "--agent", "mlp", pre="import sys; sys.modules['torch'] = None; ")
    assert p.returncode == 2
    assert "the mlp agent needs torch" in p.stderr and "--agent random" in p.stderr


def test_mlp_agent_pickles_by_state_and_acts_in_its_space():
    pytest.importorskip("torch")
    import cloudpickle
    env = make_cartpole()
    agent = bench.MLPAgent(env.observation_space, env.action_space, seed=3)
    twin = cloudpickle.loads(cloudpickle.dumps(agent))
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    a, info = agent.step(obs)
    b, _ = twin.step(obs)
    assert info is None and a.shape == (5,) and a.dtype == np.int64
    assert set(a.tolist()) <= {0, 1} and np.array_equal(a, b)
    for k, v in agent.shared_arrays().items():
        assert np.array_equal(v, twin.shared_arrays()[k])


# -- auto ------------------------------------------------------------------------------------
class _RecordingEnvFn:
    """env_fn whose envs are CountingEnvs kept in a list (those made in this process)."""

    def __init__(self):
        self.made = []

    def __call__(self):
        env = CountingEnv(lengths=(50,), base_seed=10)
        env.closed = False

        def close(env=env):
            env.closed = True
        env.close = close
        self.made.append(env)
        return env


@pytest.mark.parametrize("batch_B, n_workers", [(4, 2), (1, None), (4, 1)])
def test_auto_returns_a_working_sampler_and_logs_its_choice(caplog, no_leaks, batch_B, n_workers):
    env_fn = _RecordingEnvFn()
    agent = RandomAgent(CountingEnv().action_space)
    with caplog.at_level(logging.INFO, logger="sampling"):
        with sampling.make_sampler("auto", env_fn, agent, batch_T=6, batch_B=batch_B,
                                   n_workers=n_workers, seed=10) as s:
            assert s.kind in sampling.KINDS
            assert isinstance(s.auto_reason, str) and s.auto_reason
            batch = s.obtain_samples()
            # Every env's first observation comes from its seeded reset: nothing (the probe
            # included) stepped a training env before.
            assert batch.observation[0, :, 0].tolist() == list(range(batch_B))
            assert batch.observation[0, :, 2].tolist() == [0] * batch_B
    picked = [r.getMessage() for r in caplog.records if r.name == "sampling.auto"
              and r.getMessage().startswith("auto picked")]
    assert picked == [f"auto picked {s.kind}: {s.auto_reason}"]
    if batch_B == 1 or n_workers == 1:
        assert s.kind == "serial"
    assert env_fn.made and all(env.closed for env in env_fn.made)  # probes closed too


def test_auto_with_one_usable_cpu_picks_serial():
    # Decided before any probe: nothing can run in parallel.
    reason = auto.serial_only(batch_B=8, n_workers=8, cpus=1)
    assert "1 usable CPU" in reason
    # The model, given one CPU, agrees: the parallel kinds' CPU work runs one after another.
    kind, _ = _choose(_measured(100e-6, lambda n: 5e-6, batch_B=8, n_workers=8, cpus=1))
    assert kind == "serial" and "1 usable CPU" in reason


class _Unpicklable:
    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, observation):
        return np.zeros(len(observation), np.int64)


def _measured(env_s, agent_s, *, batch_B=16, n_workers=4, cpus=4, on_gpu=False, ships=True):
    """What the probe reports for fixed costs: env_s per env step, agent_s(n) per agent call
    on n envs, with ``cpus`` usable CPUs; an agent on a GPU or not, that the cpu kind's
    workers can get (``ships``) or not."""
    W, W_alt = auto.worker_counts(batch_B, n_workers)
    return auto.Measurements(
        env_step_s=env_s, agent_call_s={n: agent_s(n) for n in range(1, batch_B + 1)},
        batch_B=batch_B, n_workers=W, alternating_workers=W_alt, usable_cpus=cpus,
        ruled_out=auto.ruled_out(alternating_workers=W_alt, agent_on_gpu=on_gpu,
                                 agent_ships=ships))


def _choose(m):
    """(kind, reason), as choose_kind gives them for the measurements ``m``."""
    predicted = auto.predict(m)
    kind = auto.pick(predicted)
    return kind, auto.explain(kind, m, predicted, probe_s=1.0)


@pytest.mark.parametrize("env_s, agent_s, cuda, picklable, method, expect", [
    # envs dominate, cheap picklable agent: every worker runs its own copy
    (100e-6, lambda n: 5e-6, False, True, "spawn", "cpu"),
    # the same agent (cost growing with the batch), but it cannot reach spawned workers:
    # the parent serves one half while the other half steps
    (100e-6, lambda n: 10e-6 * n, False, False, "spawn", "alternating"),
    # a cheap agent, unpicklable: alternating would not be faster, so the simpler gpu
    (100e-6, lambda n: 5e-6, False, False, "spawn", "gpu"),
    # ... which fork does not need
    (100e-6, lambda n: 5e-6, False, False, "fork", "cpu"),
    # agent on a GPU, cheaper than one worker's envs: overlap the two groups
    (100e-6, lambda n: 25e-6 * n, True, True, "spawn", "alternating"),
    # agent on a GPU, dearer than one worker's envs: one batched call per step
    (20e-6, lambda n: 500e-6, True, True, "spawn", "gpu"),
    # envs so cheap next to an agent that must stay in the parent: parallel is no faster
    (0.5e-6, lambda n: 500e-6, False, False, "spawn", "serial"),
])
def test_auto_rule(env_s, agent_s, cuda, picklable, method, expect):
    if method not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip(f"no {method} here")
    agent = RandomAgent(make_cartpole().action_space) if picklable else _Unpicklable()
    ships = auto.cpu_can_ship(agent, method)  # the real check, on the real agent
    kind, reason = _choose(_measured(env_s, agent_s, on_gpu=cuda, ships=ships))
    assert kind == expect, reason
    if not picklable and method == "spawn":
        assert "cannot be pickled" in reason


def test_auto_rule_without_an_even_worker_count_never_picks_alternating():
    m = _measured(100e-6, lambda n: 200e-6, n_workers=3, on_gpu=True,
                  ships=auto.cpu_can_ship(_Unpicklable(), None))
    kind, reason = _choose(m)
    assert kind == "gpu" and "alternating (needs an even worker count" in reason


def test_auto_prefers_the_simpler_kind_unless_clearly_faster():
    gain = auto.PREFER_SIMPLER
    assert auto.pick({"cpu": 1.0 / gain * 1.01, "serial": 1.0}) == "serial"
    assert auto.pick({"cpu": 1.0 / gain * 0.99, "serial": 1.0}) == "cpu"
    assert auto.pick({"serial": 1.0, "gpu": 0.5, "alternating": 0.5 / gain * 1.01}) == "gpu"


# -- the core without the benchmark ----------------------------------------------------------
EVERY_KIND = """
import sys
import sampling
assert sampling.__file__.startswith(sys.argv[1]), sampling.__file__
for kind in list(sampling.KINDS) + ["auto"]:
    agent = sampling.RandomAgent(sampling.CartPole().action_space)
    with sampling.make_sampler(kind, sampling.CartPole, agent, batch_T=4, batch_B=4,
                               n_workers=2, start_method="fork") as s:
        assert s.obtain_samples().observation.shape[:2] == (4, 4), kind
bench = sorted(m for m in sys.modules if m.split(".")[:2] == ["sampling", "bench"])
assert not bench, bench
print("every kind ran")
"""


def _child(args, cwd, path, timeout=100):
    """Run Python with ``args`` and PYTHONPATH ``path``; ``-c`` code gets ``path`` as argv[1]."""
    args = ["-c", args, path] if isinstance(args, str) else args
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=dict(os.environ, PYTHONPATH=path))


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="no fork here")
def test_a_vendored_copy_without_the_benchmark_works(tmp_path):
    import shutil
    shutil.copytree(os.path.join(ROOT, "sampling"), tmp_path / "sampling",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(tmp_path / "sampling" / "bench")
    # -S: no site-packages .pth files, so an editable install of this checkout (a finder
    # that maps sampling.* here) cannot supply the deleted subpackage; the copy, numpy and
    # cloudpickle are all the child sees.
    import cloudpickle
    deps = sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (np, cloudpickle)})
    path = os.pathsep.join([str(tmp_path), *deps])
    p = _child(["-S", "-c", EVERY_KIND, str(tmp_path)], tmp_path, path)
    assert p.returncode == 0 and "every kind ran" in p.stdout, p.stderr
    p = _child(["-S", "-m", "sampling", "--json"], tmp_path, path)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert p.stderr.count("\n") == 1, p.stderr  # one line
    assert "sampling.bench" in p.stderr and "the core library works without it" in p.stderr


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="no fork here")
def test_no_core_module_imports_the_benchmark():
    code = """
import importlib, pkgutil, sys
import sampling
for m in pkgutil.iter_modules(sampling.__path__):
    if m.name not in ("bench", "torch_agent"):  # torch_agent needs torch, imports only tree
        importlib.import_module("sampling." + m.name)
agent = sampling.RandomAgent(sampling.CartPole().action_space)
with sampling.make_sampler("auto", sampling.CartPole, agent, batch_T=4, batch_B=4,
                           n_workers=2, start_method="fork") as s:
    s.obtain_samples()
bench = sorted(m for m in sys.modules if m.split(".")[:2] == ["sampling", "bench"])
assert not bench, bench
"""
    p = _child(code, ROOT, ROOT)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("workers, match", [
    ("1", "WorkerError: cpu sampler: worker 0"),                 # a sampler's worker fails
    ("2", "a process stepping the env alone failed: RuntimeError: boom"),  # the reference
])
def test_an_env_failing_during_the_run_exits_1_with_the_error(workers, match):
    p = run_cli(*TINY, "--workers", workers, "--kinds", "cpu", "--env", "tests.helpers:FailingEnv",
                "--env-kwargs", '{"where": "step", "after": 30}')
    assert p.returncode == 1 and p.stdout == ""
    assert match in p.stderr, p.stderr


# -- vector envs -------------------------------------------------------------------------------
def test_a_vector_env_is_benchmarked_against_the_vector_env_alone():
    rep = run_json("--env", "sampling.envs:make_vector_cartpole", "--env-kwargs",
                   '{"num_envs": 2}')
    assert rep["env_num_envs"] == 2 and rep["workers"] == 2
    ran = [r for r in rep["results"] if "skipped" not in r]
    assert {r["kind"] for r in ran} == set(sampling.KINDS)
    assert all(r["workers"] in (0, 2) for r in ran)  # one vector env per worker
    table = run_cli(*TINY, "-q", "--kinds", "serial", "--env",
                    "sampling.envs:make_vector_cartpole", "--env-kwargs", '{"num_envs": 2}')
    assert table.returncode == 0, table.stderr
    assert "vector env alone (one vector env of 2, one process):" in table.stdout
    assert "2 vector envs alone, 2 processes at once" in table.stdout


@pytest.mark.parametrize("kwargs, match", [
    ('{"num_envs": 3}', r"-B 4 is not a multiple of the vector env's num_envs=3.*-B 6"),
    ('{"num_envs": 2, "autoreset_mode": "NextStep"}', "autoreset mode NextStep"),
])
def test_a_vector_env_the_sampler_cannot_take_exits_2(kwargs, match):
    import re
    p = run_cli(*TINY, "--env", "sampling.envs:make_vector_cartpole", "--env-kwargs", kwargs)
    assert p.returncode == 2 and re.search(match, p.stderr), p.stderr


# -- --policy-lag ------------------------------------------------------------------------------
def test_policy_lag_loop_report():
    rep = run_json("--policy-lag", "--kinds", "serial,cpu,alternating", "-B", "2")
    by_kind = {r["kind"]: r for r in rep["policy_lag_results"]}
    assert set(by_kind) == {"serial", "cpu", "alternating"}
    for kind in ("serial", "cpu"):
        r = by_kind[kind]
        assert r["update_ms"] > 0 and r["sync_steps_per_s"] > 0 and r["lagged_steps_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["lagged_steps_per_s"] / r["sync_steps_per_s"])
    assert "skipped" not in by_kind["alternating"]  # 2 workers, one env each
    table = run_cli(*TINY, "-q", "--policy-lag", "--kinds", "cpu")
    assert table.returncode == 0, table.stderr
    assert "policy_lag=1" in table.stdout and "speedup" in table.stdout
