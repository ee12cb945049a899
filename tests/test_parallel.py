"""Parallel kinds against the serial sampler: the same seed and a deterministic agent give
bit-identical batches and episode stats in every kind, reset mode and start method;
evaluation, worker counts, the cpu parameter hook, recurrent agents and the sampler's
small API.

Every test here starts processes: ``no_leaks`` (tests/conftest.py) checks that none is
left alive and that no shared-memory name created by the test stays in /dev/shm.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import os

import numpy as np
import pytest

import sampling
from tests.helpers import (
    ALL_METHODS,
    GROUPED,
    KINDS,
    PARALLEL,
    RESET_MODES,
    SERVED,
    CountingAgent,
    CountingEnv,
    DictObsEnv,
    IdTraj,
    PolicyAgent,
    assert_batches_equal,
    assert_runs_equal,
    cartpole_policy,
    gym_cartpole,
    snapshot,
    with_methods,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

N_BATCHES = 3


# -- helpers ---------------------------------------------------------------------------
def run(kind, env_fn, agent, n=N_BATCHES, **kw) -> list:
    with sampling.make_sampler(kind, env_fn, agent, **kw) as s:
        return [snapshot(b) for b in s.steps(n)]


LENGTHS = (3, 5, 4, 7)
COUNTING = functools.partial(CountingEnv, lengths=LENGTHS)
COUNTING_KW = dict(bootstrap_value=True, final_observation=True, traj_info=IdTraj)

# name -> () -> (env_fn, agent factory, extra make_sampler options)
CONFIGS = {
    "cartpole": lambda: (functools.partial(sampling.CartPole, max_episode_steps=30),
                         lambda: cartpole_policy, dict(final_observation=True)),
    "counting": lambda: (COUNTING, CountingAgent, COUNTING_KW),
    "counting_decorrelated": lambda: (COUNTING, CountingAgent,
                                      dict(COUNTING_KW, max_decorrelation_steps=15)),
    "gymnasium": lambda: (gym_cartpole(max_episode_steps=30),
                          lambda: PolicyAgent(cartpole_policy, {"theta": 2}),
                          dict(final_observation=True)),
}


def _master_params() -> list:
    """Every kind, reset mode and config, under METHODS; where METHODS is reduced to fork,
    each config also once under spawn (everything pickled into a fresh interpreter)."""
    out = []
    for config in CONFIGS:
        for kind, mode, method in with_methods([(k, m) for k in PARALLEL
                                                for m in RESET_MODES], key=config):
            if config == "counting_decorrelated" and method == "forkserver":
                # decorrelation is worker code that runs after env_fn(), the same under
                # every start method: fork and spawn (fresh interpreter, everything
                # pickled) cover it and keep this file's time down
                continue
            out.append(pytest.param(kind, method, mode, config,
                                    id=f"{kind}-{method}-{mode}-{config}"))
    return out


SIZE = dict(batch_T=24, batch_B=4, seed=5)
_serial_cache: dict = {}


def serial_reference(config: str, reset_mode: str) -> list:
    key = (config, reset_mode)
    if key not in _serial_cache:
        env_fn, agent_fn, extra = CONFIGS[config]()
        _serial_cache[key] = run("serial", env_fn, agent_fn(), reset_mode=reset_mode,
                                 **SIZE, **extra)
    return _serial_cache[key]


# -- the master test -------------------------------------------------------------------
@pytest.mark.parametrize("kind,start_method,reset_mode,config", _master_params())
def test_bit_identical_to_serial(kind, start_method, reset_mode, config):
    env_fn, agent_fn, extra = CONFIGS[config]()
    ref = serial_reference(config, reset_mode)
    got = run(kind, env_fn, agent_fn(), reset_mode=reset_mode, n_workers=2,
              start_method=start_method, **SIZE, **extra)
    assert len(got) == len(ref) == N_BATCHES
    assert_runs_equal(got, ref)
    # the comparison is not vacuous: episodes ended, and the optional fields are there
    assert sum(len(r["traj_infos"]) for r in ref) >= 2
    if config.startswith("counting"):
        assert {"agent_info", "env_info", "bootstrap_value", "final_observation"} <= set(ref[0])
        assert ref[0]["agent_info"] and ref[0]["env_info"]


@pytest.mark.parametrize("reset_mode", RESET_MODES)
@pytest.mark.parametrize("kind", PARALLEL)
def test_dict_observations_match_serial(kind, reset_mode):
    kw = dict(batch_T=10, batch_B=4, seed=1, reset_mode=reset_mode, final_observation=True)
    ref = run("serial", DictObsEnv, CountingAgent(), **kw)
    got = run(kind, DictObsEnv, CountingAgent(), n_workers=2, start_method="fork", **kw)
    assert_runs_equal(got, ref)
    assert got[0]["observation"]["img"].dtype == np.uint8
    assert got[0]["final_observation"]["n"]["k"].dtype == np.int64


# -- evaluation ------------------------------------------------------------------------
EVAL_RULES = {
    "max_trajectories": dict(eval_max_trajectories=5),
    "max_steps": dict(eval_max_steps=36),
    "both": dict(eval_max_steps=60, eval_max_trajectories=7),
}
EVAL_KW = dict(batch_T=8, batch_B=4, seed=2, eval_n_envs=4, traj_info=IdTraj)


def _evaluate(kind, rule, **kw) -> tuple:
    with sampling.make_sampler(kind, COUNTING, CountingAgent(), **EVAL_KW, **EVAL_RULES[rule],
                               **kw) as s:
        s.obtain_samples(0)
        first = [t.stats() for t in s.evaluate_agent(0)]
        second = [t.stats() for t in s.evaluate_agent(1)]
    return first, second


@pytest.mark.parametrize("rule", list(EVAL_RULES))
@pytest.mark.parametrize("kind", SERVED)
def test_evaluation_identical_to_serial(kind, rule):
    ref = _evaluate("serial", rule)
    got = _evaluate(kind, rule, n_workers=2, start_method="fork")
    assert got == ref
    first, second = ref
    assert first and second
    if "eval_max_trajectories" in EVAL_RULES[rule]:
        assert len(first) <= EVAL_RULES[rule]["eval_max_trajectories"]
    # eval env e is seeded with seed + batch_B + e on the first evaluation
    assert {t["EnvId"] for t in first} <= {2 + 4 + e for e in range(4)}
    assert len({t["EnvId"] for t in first}) > 1


@pytest.mark.parametrize("rule", list(EVAL_RULES))
def test_cpu_evaluation_returns_full_episodes(rule):
    """Whole episodes, and exactly serial's (same seeds, a deterministic agent): the
    workers step in lockstep and the parent stops them all at the same step."""
    first, second = _evaluate("cpu", rule, n_workers=2, start_method="fork")
    assert (first, second) == _evaluate("serial", rule)
    limit = EVAL_RULES[rule].get("eval_max_trajectories")
    for res in (first, second):
        assert res, "no episode finished"
        if limit is not None:
            assert len(res) <= limit
        for t in res:
            assert t["StartT"] == 0 and t["FinalT"] == t["Length"]  # a whole episode
            assert t["Length"] in LENGTHS
            assert t["Return"] == t["Length"] * (t["Length"] + 1) / 2
            assert 6 <= t["EnvId"] < 10


@pytest.mark.parametrize("kind", PARALLEL)
def test_training_unaffected_by_evaluation(kind):
    kw = dict(batch_T=8, batch_B=4, seed=2, **COUNTING_KW)
    ref = run("serial", COUNTING, CountingAgent(), n=2, **kw)  # no evaluation in between
    with sampling.make_sampler(kind, COUNTING, CountingAgent(), n_workers=2,
                               start_method="fork", eval_n_envs=2, eval_max_steps=10,
                               **kw) as s:
        first = snapshot(s.obtain_samples(0))
        assert s.evaluate_agent(0)
        second = snapshot(s.obtain_samples(1))
    assert_batches_equal(first, ref[0], "batch 0")
    assert_batches_equal(second, ref[1], "batch 1")


@pytest.mark.parametrize("kind", PARALLEL)
def test_evaluation_with_fewer_eval_envs_than_workers(kind):
    """eval_n_envs=1 over 2 workers: worker 1 has no eval env (an eval collector without
    columns), with the default TrajInfo; the episodes are serial's."""
    kw = dict(batch_T=8, batch_B=4, seed=2, eval_n_envs=1, eval_max_steps=30)

    def evaluate(kind: str, **more) -> list:
        with sampling.make_sampler(kind, COUNTING, CountingAgent(), **kw, **more) as s:
            s.obtain_samples(0)
            return [t.stats() for t in s.evaluate_agent(0)]
    ref = evaluate("serial")
    assert len(ref) >= 2
    assert evaluate(kind, n_workers=2, start_method="fork") == ref


def test_evaluation_under_spawn_matches_serial():
    ref = _evaluate("serial", "both")
    assert _evaluate("alternating", "both", n_workers=2, start_method="spawn") == ref


# -- worker counts ---------------------------------------------------------------------
class PidEnv(CountingEnv):
    """CountingEnv whose env_info says which process stepped it."""

    def step(self, action):
        out = super().step(action)
        out[4]["pid"] = os.getpid()
        return out


def _owners(pids: np.ndarray) -> list:
    """Group env indices by the pid that stepped them (columns of a [T, B] array)."""
    assert (pids == pids[:1]).all(), "an env moved between processes"
    groups: dict = {}
    for b, pid in enumerate(pids[0]):
        groups.setdefault(int(pid), []).append(b)
    assert os.getpid() not in groups
    return sorted(groups.values())


@pytest.mark.parametrize("kind,B,W,owners", [
    ("cpu", 5, 2, [[0, 1, 2], [3, 4]]),
    ("gpu", 5, 2, [[0, 1, 2], [3, 4]]),
    ("cpu", 7, 3, [[0, 1, 2], [3, 4], [5, 6]]),
    ("alternating", 6, 2, [[0, 1, 2], [3, 4, 5]]),
    ("no_overlap_alternating", 8, 4, [[0, 1], [2, 3], [4, 5], [6, 7]]),
])
def test_uneven_and_grouped_splits_match_serial(kind, B, W, owners):
    kw = dict(batch_T=10, batch_B=B, seed=1, **COUNTING_KW)
    ref = run("serial", COUNTING, CountingAgent(), **kw)
    got = run(kind, COUNTING, CountingAgent(), n_workers=W, start_method="fork", **kw)
    assert_runs_equal(got, ref)
    (b,) = run(kind, PidEnv, CountingAgent(), n=1, n_workers=W, start_method="fork",
               batch_T=3, batch_B=B)
    assert _owners(b["env_info"]["pid"]) == owners


@pytest.mark.parametrize("kind,B,W,used", [("cpu", 2, 4, 2), ("gpu", 3, 5, 3),
                                           ("alternating", 2, 4, 2),
                                           ("no_overlap_alternating", 2, 3, 2)])
def test_more_workers_than_envs_warns(kind, B, W, used):
    with pytest.warns(UserWarning, match=rf"n_workers={W} > batch_B={B}"):
        s = sampling.make_sampler(kind, COUNTING, CountingAgent(), batch_T=5, batch_B=B,
                                  n_workers=W, start_method="fork")
    with s:
        assert s.n_workers == used
        got = snapshot(s.obtain_samples(0))
    (ref,) = run("serial", COUNTING, CountingAgent(), n=1, batch_T=5, batch_B=B)
    assert_batches_equal(got, ref)


@pytest.mark.parametrize("kind", GROUPED)
@pytest.mark.parametrize("B,W,match", [
    (6, 3, r"even number of workers.*n_workers=3"),
    (8, 1, r"even number of workers.*n_workers=1"),
    (6, 4, r"two equal groups.*batch_B=6 over n_workers=4"),
    (5, 2, r"two equal groups.*batch_B=5"),
])
def test_alternating_bad_worker_split_raises(kind, B, W, match):
    with pytest.raises(ValueError, match=match):
        sampling.make_sampler(kind, COUNTING, CountingAgent(), batch_T=5, batch_B=B,
                              n_workers=W, start_method="fork")
    assert not mp.active_children()


def test_default_n_workers():
    with sampling.make_sampler("cpu", COUNTING, CountingAgent(), batch_T=2, batch_B=3,
                               start_method="fork") as s:
        assert s.n_workers == min(3, sampling.usable_cpus())
    with sampling.make_sampler("alternating", COUNTING, CountingAgent(), batch_T=2,
                               batch_B=4, start_method="fork") as s:
        assert s.n_workers >= 2 and s.n_workers % 2 == 0


# -- the cpu parameter hook ------------------------------------------------------------
class ParamAgent:
    """Acts from its parameters only: action = inner.b % 3; agent_info reports sum(w) and the
    pid of the process that ran it."""

    def __init__(self):
        self.params = {"w": np.zeros(3), "inner": {"b": np.zeros((), np.int64)}}

    def shared_arrays(self):
        return self.params

    def step(self, observation, prev_action, prev_reward):
        n = len(observation)
        a = np.full(n, int(self.params["inner"]["b"]) % 3, np.int64)
        return a, {"w": np.full(n, self.params["w"].sum()), "pid": np.full(n, os.getpid())}


@pytest.mark.start_method_matters  # parameter mirroring under spawn
@pytest.mark.parametrize("start_method", [m for m in ("fork", "spawn") if m in ALL_METHODS])
def test_cpu_workers_pick_up_new_parameters(start_method):
    agent = ParamAgent()
    with sampling.make_sampler("cpu", COUNTING, agent, batch_T=6, batch_B=4, n_workers=2,
                               start_method=start_method) as s:
        b0 = snapshot(s.obtain_samples(0))
        agent.params["w"][:] = [1.0, 2.0, 3.5]
        agent.params["inner"]["b"][...] = 2
        b1 = snapshot(s.obtain_samples(1))
        b2 = snapshot(s.obtain_samples(2))  # unchanged parameters stay
        agent.params["w"][0] = 10.0
        agent.params["inner"]["b"][...] = 1
        b3 = snapshot(s.obtain_samples(3))
    assert len(_owners(b0["agent_info"]["pid"])) == 2  # the workers ran their own copies
    for bt, w, a in ((b0, 0.0, 0), (b1, 6.5, 2), (b2, 6.5, 2), (b3, 15.5, 1)):
        np.testing.assert_array_equal(bt["agent_info"]["w"], w)
        np.testing.assert_array_equal(bt["action"], a)
        # the env saw those actions (obs[3] is the last action, within an episode)
        mid = bt["observation"][1:, :, 2] > 0
        np.testing.assert_array_equal(bt["observation"][1:, :, 3][mid], a)


# -- recurrent agents ------------------------------------------------------------------
class StepCounterAgent:
    """Recurrent: its action depends on per-env state (steps since reset_one), indexed by
    the global env ids it is given."""

    def __init__(self, n_envs=16):
        self.counter = np.zeros(n_envs, np.int64)

    def reset(self):
        self.counter[:] = 0

    def reset_one(self, idx):
        self.counter[idx] = 0

    def step(self, observation, prev_action, prev_reward, env_ids):
        c = self.counter[env_ids].copy()
        self.counter[env_ids] += 1
        return (c * 7 + c // 2) % 3, {"mem": c}


@pytest.mark.parametrize("reset_mode", RESET_MODES)
@pytest.mark.parametrize("kind", PARALLEL)
def test_recurrent_agent_matches_serial(kind, reset_mode):
    kw = dict(batch_T=9, batch_B=4, seed=0, reset_mode=reset_mode, n=4)
    ref = run("serial", COUNTING, StepCounterAgent(), **kw)
    got = run(kind, COUNTING, StepCounterAgent(), n_workers=2, start_method="fork", **kw)
    assert_runs_equal(got, ref)
    # the per-env state was reset at each episode's start: memory == steps into the episode
    for bt in ref:
        obs, mem = bt["observation"], bt["agent_info"]["mem"]
        live = obs[..., 0] == np.arange(4)  # not a zero row of a waiting env
        np.testing.assert_array_equal(mem[live], obs[..., 2][live])
    assert sum(len(bt["traj_infos"]) for bt in ref) >= 4


# -- small API -------------------------------------------------------------------------
class ItrAgent:
    """Reports, in agent_info, the itr of its last sample_mode call (in its own process)."""

    def __init__(self):
        self.itr = -1

    def sample_mode(self, itr):
        self.itr = itr

    def step(self, observation, prev_action, prev_reward):
        n = len(prev_reward)
        return np.zeros(n, np.int64), {"itr": np.full(n, self.itr, np.int64)}


@pytest.mark.parametrize("kind", KINDS)
def test_steps_and_obtain_samples_pass_itr(kind):
    agent = ItrAgent()
    workers = sampling.KINDS[kind].workers
    with sampling.make_sampler(kind, COUNTING, agent, batch_T=3, batch_B=4,
                               n_workers=2 if workers else None, start_method="fork") as s:
        assert s.kind == kind
        assert (s.batch_T, s.batch_B) == (3, 4)
        assert s.n_workers == (2 if workers else 0)
        r = repr(s)
        assert f"kind={kind!r}" in r and "open" in r and "batch_B=4" in r
        seen = [int(b.agent_info["itr"][0, 0]) for b in s.steps(3)]
        assert seen == [0, 1, 2]
        b = s.obtain_samples(10)
        np.testing.assert_array_equal(b.agent_info["itr"], 10)
        assert agent.itr == 10  # the parent's agent too (it may own the parameters)
        assert [int(b.agent_info["itr"][0, 0]) for b in s.steps(1)] == [11]
        assert list(s.steps(0)) == []
        with pytest.raises(ValueError, match="non-negative int"):
            next(s.steps(-1))
    assert "closed" in repr(s)
