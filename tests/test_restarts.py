"""max_restarts: a worker that raises, dies or misses its step deadline is replaced and the
batch goes on, by one rule (the cut episodes end truncated at the last complete step; the
rest of the worker's columns is padding), in every parallel kind and start method, during
batches, start-up (decorrelation) and evaluation; the same failures give the same
batches; the budget runs out into the usual WorkerError.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

import sampling
from sampling import WorkerError
from sampling.samplers import Batch
from tests.fault_helpers import wait_until, worker_pid
from tests.helpers import (
    PARALLEL,
    CountingAgent,
    CountingEnv,
    FaultEnv,
    HangingEnv,
    IdTraj,
    assert_runs_equal,
    in_worker,
    snapshot,
    vectorized,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

T, B, W = 8, 4, 2
# Env 3 (worker 1's second env) fails at its 11th step: row 2 of batch 1. Its replacement
# is seeded afresh, so (FaultEnv arms itself by its seed) it never fails again.
FAIL_ROW = 2


def faulty(how="raise", where="step", after=10, fail_env=3, **kw):
    return functools.partial(FaultEnv, where=where, after=after, fail_env=fail_env, how=how,
                             lengths=(20, 30), **kw)


def sampler(kind, env_fn, agent=None, **kw):
    opts = dict(batch_T=T, batch_B=B, n_workers=W, max_restarts=2, final_observation=True,
                bootstrap_value=True, traj_info=IdTraj)
    opts.update(kw)
    return sampling.make_sampler(kind, env_fn, agent or CountingAgent(), **opts)


def snap(batch) -> dict:
    """A copy of the batch, its restarts as (worker, during, step, restart) tuples."""
    out = snapshot(Batch({k: v for k, v in batch.items() if k != "restarts"}))
    out["restarts"] = np.array([(r.worker, r.during == "batch", -1 if r.step is None else r.step,
                                 r.restart) for r in batch.restarts], np.int64)
    return out


def assert_cut(batch, cols, t):
    """The restart rule for columns ``cols`` of a batch cut at row ``t``."""
    lo, hi = cols
    if t >= 1:
        assert batch.truncated[t - 1, lo:hi].all() or batch.done[t - 1, lo:hi].all()
        assert batch.done[t - 1, lo:hi].all()
    for name in ("observation", "action", "reward", "prev_action", "prev_reward"):
        assert not np.any(batch[name][t:, lo:hi]), name
    assert not batch.terminated[t:, lo:hi].any()
    assert batch.truncated[t:, lo:hi].all() and batch.done[t:, lo:hi].all()
    assert not batch.bootstrap_value[lo:hi].any()


@pytest.mark.parametrize("kind", PARALLEL)
def test_a_failing_env_is_restarted_and_the_batch_goes_on(kind, caplog):
    with sampler(kind, faulty()) as s:
        batches = []
        for b in s.steps(4):
            batches.append(snapshot(Batch({k: v for k, v in b.items() if k != "restarts"})))
            batches[-1]["restarts"] = list(b.restarts)
    assert [len(b["restarts"]) for b in batches] == [0, 1, 0, 0]
    r = batches[1]["restarts"][0]
    assert (r.worker, r.envs, r.during, r.step, r.restart) == (1, [2, 3], "batch", FAIL_ROW, 1)
    assert "boom in step of env 3" in str(r.error) and r.error.remote_traceback
    # README: "Each restart is also logged at WARNING (logger sampling.pool) with the
    # worker's traceback."
    (record,) = [x for x in caplog.records if "restarting worker" in x.getMessage()]
    assert (record.name, record.levelno) == ("sampling.pool", logging.WARNING)
    message = record.getMessage()
    assert message.startswith("restarting worker 1 (1 restart left)"), message
    assert r.error.remote_traceback in message
    assert "in _inject_fault" in message and "EnvFault: boom in step of env 3" in message
    b1 = Batch({k: v for k, v in batches[1].items()})
    assert_cut(b1, (2, 4), FAIL_ROW)
    # The episodes cut after row 1 end there, truncated; their final observation is row 2's.
    assert b1.truncated[FAIL_ROW - 1, 2:4].all()
    assert b1.final_observation[FAIL_ROW - 1, 3, 2] == 10  # obs t of env 3 after 10 steps
    # The other worker's columns are untouched; the replaced envs start afresh next batch.
    assert not b1.done[:, 0:2].any()
    nxt = batches[2]["observation"]
    assert (nxt[0, 2:4, 2] == 0).all()
    # fresh seeds, by sampling.env_seed's formula (CountingEnv's obs[0] is its seed)
    assert nxt[0, 2:4, 0].tolist() == np.float32([sampling.env_seed(0, b, 1)
                                                  for b in (2, 3)]).tolist()
    assert not batches[2]["prev_reward"][0, 2:4].any()
    # No episode stats are invented: the cut episodes are not in traj_infos.
    assert all(t["EnvId"] not in (2, 3) for t in batches[1]["traj_infos"])


def test_env_seed_is_the_documented_formula():
    """README: env b of a worker restarted k times is first reset with seed + b for k = 0,
    and the first 32-bit word of numpy.random.SeedSequence([seed, b, k]) after."""
    assert [sampling.env_seed(7, b) for b in range(3)] == [7, 8, 9]
    assert sampling.env_seed(7, 2, 0) == 9
    for seed, b, k in [(0, 2, 1), (0, 3, 1), (7, 2, 1), (7, 2, 2), (123, 45, 6)]:
        want = np.random.SeedSequence([seed, b, k]).generate_state(1, dtype=np.uint32)[0]
        got = sampling.env_seed(seed, b, k)
        assert type(got) is int and got == int(want) and 0 <= got < 2**32, (seed, b, k)
    # distinct for each env and each restart
    assert len({sampling.env_seed(0, b, k) for b in range(4) for k in range(1, 4)}) == 12


@pytest.mark.start_method_matters  # the segment passed by descriptor to a fresh interpreter
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_restarts_under_every_start_method(kind, method):
    """A replacement maps the segment through its descriptor (the name is long gone): its
    batches are the fork run's, bit for bit, restarts included."""
    runs = {}
    for m in ("fork", method):
        with sampler(kind, faulty(), start_method=m) as s:
            runs[m] = [snap(b) for b in s.steps(3)]
    assert [len(b["restarts"]) for b in runs["fork"]] == [0, 1, 0]
    assert runs["fork"][1]["restarts"].tolist() == [[1, 1, FAIL_ROW, 1]]
    assert_runs_equal(runs[method], runs["fork"])
    assert (runs[method][2]["observation"][0, 2:4, 2] == 0).all()  # the replacement stepped


def test_the_same_failures_give_the_same_batches_in_every_kind():
    runs = {}
    for kind in PARALLEL:
        with sampler(kind, faulty()) as s:
            runs[kind] = [snap(b) for b in s.steps(4)]
    ref = runs.pop("cpu")
    assert ref[1]["restarts"].tolist() == [[1, 1, FAIL_ROW, 1]]
    for run in runs.values():
        assert_runs_equal(run, ref)


def test_wait_mode_and_vector_envs_follow_the_same_rule():
    runs = []
    for kind in ("cpu", "gpu"):
        with sampler(kind, faulty(), reset_mode="wait") as s:
            runs.append([snap(b) for b in s.steps(3)])
    assert_runs_equal(runs[1], runs[0])
    assert runs[0][1]["restarts"].tolist() == [[1, 1, FAIL_ROW, 1]]
    assert_cut(Batch(runs[0][1]), (2, 4), FAIL_ROW)
    env = vectorized(faulty(), 2)  # worker 1 holds one vector env: envs 2 and 3
    with sampler("cpu", env) as s:
        b = [snap(b) for b in s.steps(3)]
    assert b[1]["restarts"].tolist() == [[1, 1, FAIL_ROW, 1]]
    assert_cut(Batch(b[1]), (2, 4), FAIL_ROW)
    assert (b[2]["observation"][0, 2:4, 2] == 0).all()


KILL_T = 50  # steps per batch in the SIGKILL test
KILL_ROW = 17  # the row of its second batch in which worker 1 is killed
# How long the test waits for worker 1 to reach that row (a few ms of work): a bound for a
# loaded machine.
REACH_BOUND_S = 30.0


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_a_worker_sigkilled_mid_batch_then_20_more_batches(kind, tmp_path):
    """Killed from outside, mid-batch: the rule holds from that step. Env 3 stamps the
    time and stops in row KILL_ROW of the second batch (its step KILL_T + KILL_ROW + 1),
    and a thread SIGKILLs worker 1 once the stamp is there. (Its replacement is seeded
    afresh, so it never stops again.)"""
    stamp = tmp_path / "in_the_step"
    env = functools.partial(HangingEnv, where="step", how="sleep", stuck_env=3,
                            after=KILL_T + KILL_ROW, safe_pid=os.getpid(), stamp=str(stamp),
                            lengths=(5, 7))
    with sampler(kind, env, batch_T=KILL_T, max_restarts=1) as s:
        s.obtain_samples()
        victim = worker_pid(kind, 1)
        reached: list = []

        def kill_when_inside():
            reached.append(wait_until(stamp.exists, REACH_BOUND_S, period=0.01))
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_inside)
        killer.start()
        b = s.obtain_samples()
        killer.join()
        assert reached == [True]
        (r,) = b.restarts
        assert (r.worker, r.during, r.step) == (1, "batch", KILL_ROW)
        assert "killed by signal SIGKILL" in str(r.error)
        assert_cut(b, (2, 4), r.step)
        assert not b.done[:, :2].all()
        more = [list(b.restarts) for b in s.steps(20)]
    assert more == [[]] * 20


def test_the_budget_runs_out_into_the_usual_error():
    """An env that raises at every 100th step of its life (every other batch): 3
    restarts, then the error."""
    env = functools.partial(EveryNthStep, n=100)
    with sampler("cpu", env, batch_T=50, max_restarts=3) as s:
        with pytest.raises(WorkerError, match="step 100 of its life") as info:
            for _ in s.steps(20):
                pass
    assert [(r.worker, r.step, r.restart) for r in s.restarts] == [(0, 49, k) for k in (1, 2, 3)]
    assert info.value.worker == 0
    with pytest.raises(sampling.SamplerClosedError):
        s.obtain_samples()


class EveryNthStep(CountingEnv):
    """Raises at every ``n``-th step of its life (replacements too), in worker 0."""

    def __init__(self, n=100, **kw):
        super().__init__(lengths=(1000,), **kw)
        self.n, self.life = n, 0

    def step(self, action):
        self.life += 1
        if self.life % self.n == 0 and in_worker(0):
            raise RuntimeError(f"step {self.life} of its life")
        return super().step(action)


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_a_stuck_env_is_restarted(kind):
    env = functools.partial(HangingEnv, where="step", how="sleep", stuck_env=3, after=10,
                            safe_pid=os.getpid(), lengths=(20,))
    t0 = time.monotonic()
    with sampler(kind, env, step_timeout=0.5) as s:
        restarts = [list(b.restarts) for b in s.steps(3)]
    assert time.monotonic() - t0 < 15
    assert [len(r) for r in restarts] == [0, 1, 0]
    r = restarts[1][0]
    assert "did not return" in str(r.error) and r.step == FAIL_ROW


@pytest.mark.parametrize("where, after", [("reset", 0), ("step", 1)])
def test_failures_at_start_and_in_decorrelation_are_restarted(where, after):
    """Env 3 fails in its first reset, or in its 2nd of 3 decorrelation steps (seed 0)."""
    env = faulty(where=where, after=after)
    with sampler("cpu", env, max_decorrelation_steps=5) as s:
        b = s.obtain_samples()
        assert [(r.worker, r.during, r.step) for r in b.restarts] == [(1, "start", None)]
        assert not b.done[:, 2:4].all()  # nothing to pad: the worker started afresh


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_a_failure_during_evaluation(kind):
    # Eval env 1 (global env B + 1, seeded seed + B + 1) fails at its 3rd step.
    env = faulty(fail_env=B + 1, after=2)
    with sampler(kind, env, eval_n_envs=2, eval_max_steps=2 * 12) as s:
        s.obtain_samples()
        episodes = s.evaluate_agent()
        assert [(r.worker, r.during) for r in episodes.restarts] == [(1, "evaluation")]
        b = s.obtain_samples()
        assert [r.during for r in b.restarts] == ["evaluation"]
        # Worker 1's training envs were rebuilt: new episodes from row 0, fresh seeds.
        assert (b.observation[0, 2:4, 2] == 0).all() and (b.observation[0, 2:4, 0] > 100).all()
        assert s.evaluate_agent().restarts == []


class NanOnce(CountingEnv):
    """Env 3 returns a nan reward at its 13th step (row 4 of batch 1), in its first life."""

    def step(self, action):
        obs, r, te, tr, info = super().step(action)
        self.n = getattr(self, "n", 0) + 1
        return obs, (float("nan") if self.env_id == 3 and self.n == 13 else r), te, tr, info


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_a_bad_value_found_after_its_step_cuts_the_batch_at_its_row(kind):
    """Rewards are checked once per batch, after the steps: the cut is the bad row's."""
    with sampler(kind, functools.partial(NanOnce, lengths=(40,))) as s:
        b = [snap(b) for b in s.steps(3)]
    assert b[1]["restarts"].tolist() == [[1, 1, 4, 1]]
    assert np.isfinite(b[1]["reward"]).all()
    assert_cut(Batch(b[1]), (2, 4), 4)


class RaiseAt(CountingEnv):
    """Every env raises at its 11th step, in its first life."""

    def step(self, action):
        if self.env_id < 100 and self.t == 10:  # fresh seeds make env_id large
            raise RuntimeError(f"boom in env {self.env_id}")
        return super().step(action)


@pytest.mark.parametrize("kind", ["gpu", "alternating"])
def test_workers_that_raise_together_are_reported_as_raising_not_stuck(kind):
    with sampler(kind, functools.partial(RaiseAt, lengths=(40,)), step_timeout=0.2) as s:
        b = [list(b.restarts) for b in s.steps(3)]
    assert [r.worker for r in b[1]] == [0, 1]
    for r in b[1]:
        assert "raised RuntimeError: boom in env" in str(r.error), r.error
        assert r.step == FAIL_ROW


class PoisonedAfterFirst(CountingEnv):
    """Env 3 fails at its 11th step and leaves a mark; worker 1 then fails in env_fn."""

    def __init__(self, mark, **kw):
        if in_worker(1) and os.path.exists(mark):
            raise RuntimeError("env_fn fails after the first failure")
        super().__init__(lengths=(40,), **kw)
        self.mark, self.n = mark, 0

    def step(self, action):
        self.n += 1
        if self.env_id == 3 and self.n == 11:
            open(self.mark, "w").close()
            raise RuntimeError("the first failure")
        return super().step(action)


def test_a_replacement_failing_the_same_way_at_the_same_point_is_not_absorbed(tmp_path):
    """The same-failure rule: the first replacement fails to start (a new failure: absorbed,
    recorded); the second fails the same way at the same point before finishing a command
    (deterministic: raised, though the budget had a restart left)."""
    env = functools.partial(PoisonedAfterFirst, str(tmp_path / "mark"))
    with sampler("cpu", env, max_restarts=3) as s:
        with pytest.raises(WorkerError, match=r"env_fn fails after the first failure.* It is "
                                              r"not absorbed \(max_restarts\): its replacement "
                                              r"failed the same way at the same point"):
            for _ in s.steps(4):
                pass
    assert [(r.worker, r.during, r.restart) for r in s.restarts] == [
        (1, "batch", 1), (1, "start", 2)]


class SlowInWorker1(CountingEnv):
    def step(self, action):
        if in_worker(1):
            time.sleep(0.7)  # longer than pool.POLL_S
        return super().step(action)


def test_alternating_waits_for_a_slow_group_while_the_other_has_finished():
    """The first group finishes its batch (and replies) while the parent still waits for
    the second's observations, longer than one POLL_S: no failure, with or without a
    budget."""
    for budget in (0, 1):
        with sampling.make_sampler("alternating", SlowInWorker1, CountingAgent(), batch_T=2,
                                   batch_B=2, n_workers=2, max_restarts=budget) as s:
            b = s.obtain_samples()
            assert not b.done.all() and b.get("restarts", []) == []


class Version:
    """Its parameter is a version the test bumps after every batch; agent_info says which
    version chose each action."""

    def __init__(self):
        self.v = np.zeros(1)

    def shared_arrays(self):
        return {"v": self.v}

    def step(self, observation, prev_action, prev_reward):
        n = len(observation)
        return np.zeros(n, np.int64), {"version": np.full(n, self.v[0], np.float32)}


def test_a_cpu_replacement_gets_the_current_parameters():
    agent = Version()
    with sampler("cpu", faulty(), agent, bootstrap_value=False) as s:
        for i, b in enumerate(s.steps(4)):
            if i >= 2:
                assert (b.agent_info["version"] == i).all()
            agent.v += 1


def test_a_served_agent_resets_the_restarted_envs_state():
    agent = CountingAgent()
    with sampler("gpu", faulty(), agent) as s:
        s.obtain_samples()
        before = len(agent.calls)
        s.obtain_samples()  # worker 1 fails in this one
        resets = [c for c in agent.calls[before:] if c[0] == "reset_one"]
    assert {("reset_one", 2), ("reset_one", 3)} <= set(resets)


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_restarts_with_policy_lag(kind):
    with sampler(kind, faulty(), policy_lag=1) as s:
        restarts = [list(b.restarts) for b in s.steps(4)]
    assert [len(r) for r in restarts] == [0, 1, 0, 0]


@pytest.mark.parametrize("value, error, match", [
    (-1, ValueError, "max_restarts must be >= 0"),
    (1.5, TypeError, "max_restarts must be an int"),
    (True, TypeError, "max_restarts must be an int"),
    ("2", TypeError, "max_restarts must be an int"),
])
def test_a_bad_budget_is_refused_before_anything_starts(value, error, match):
    def env_fn():
        raise AssertionError("no env may be built")
    with pytest.raises(error, match=match):
        sampling.make_sampler("cpu", env_fn, lambda o: o, batch_T=2, batch_B=2,
                              max_restarts=value)


def test_serial_cannot_restart():
    with pytest.raises(ValueError, match="max_restarts needs worker processes"):
        sampling.make_sampler("serial", CountingEnv, lambda o: o, batch_T=2, batch_B=2,
                              max_restarts=1)


@pytest.mark.parametrize("option", [{"max_restarts": 1}, {"step_timeout": 5.0}])
@pytest.mark.parametrize("also_wrong", [{"bootstrap_value": True}, {"policy_lag": 2},
                                        {"cpu_affinity": "x"}, {"rank": 2}])
def test_what_the_kind_cannot_do_is_the_first_error(option, also_wrong):
    # (a lambda agent has no value(); rank 2 of world_size 1)
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"^{name} needs worker processes: the serial kind"):
        sampling.make_sampler("serial", CountingEnv, lambda o: o, batch_T=2, batch_B=2,
                              **option, **also_wrong)


def test_no_restarts_key_without_a_budget():
    with sampling.make_sampler("cpu", CountingEnv, CountingAgent(), batch_T=2, batch_B=2) as s:
        assert "restarts" not in s.obtain_samples()
