"""policy_lag=1: the next batch is collected while the caller trains on this one, with the
parameters exactly one update behind, in every kind and start method; batches stay valid
until the next call; evaluation, faults, Ctrl-C and shutdown with a batch in flight.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pytest

import sampling
from sampling import SamplerClosedError, WorkerError
from tests.fault_helpers import interrupt_after, sampling_children, worker_pid
from tests.helpers import (
    METHODS,
    PARALLEL,
    SERVED,
    CountingAgent,
    CountingEnv,
    EnvFault,
    FaultEnv,
    IdTraj,
    RecurrentCounter,
    SlowEnv,
    assert_batches_equal,
    assert_runs_equal,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

BOUND_S = 5.0  # a fault or a Ctrl-C must surface within this many seconds
ENV = functools.partial(CountingEnv, lengths=(3, 5, 4))
SIZE = dict(batch_T=6, batch_B=4, seed=1, traj_info=IdTraj, final_observation=True)


class VersionAgent:
    """Its one parameter is a version number, which the test's "training" increments after
    every batch; actions depend on it (so batches differ by version) and agent_info says
    which version acted. Mirrored into copies through shared_arrays()."""

    def __init__(self):
        self.v = np.zeros(1)
        self.modes: list = []

    def shared_arrays(self):
        return {"v": self.v}

    def sample_mode(self, itr):
        self.modes.append(itr)

    def step(self, observation, prev_action, prev_reward):
        n, v = len(observation), int(self.v[0])
        return ((observation[:, 0].astype(np.int64) + v) % 3,
                {"version": np.full(n, v, np.int64)})

    def value(self, observation, prev_action, prev_reward):
        return observation[:, 2] + self.v[0]


def _train(kind, n=5, **kw) -> list:
    """Batches of a loop whose update bumps the version; checks the exact lag as it goes."""
    agent = VersionAgent()
    out = []
    with sampling.make_sampler(kind, ENV, agent, policy_lag=1, bootstrap_value=True,
                               **SIZE, **kw) as s:
        for k, batch in enumerate(s.steps(n)):
            # batch 0 and batch 1 both act with the parameters of the first call; batch k
            # with those after the update on batch k-2, i.e. as they were when batch k-1
            # was asked for.
            assert (batch.agent_info["version"] == max(k - 1, 0)).all(), (k, batch.agent_info)
            out.append(snapshot(batch))
            agent.v += 1  # the update on batch k
    return out


_serial: list = []


def _serial_reference() -> list:
    if not _serial:
        _serial.extend(_train("serial"))
    return _serial


@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", PARALLEL)
def test_exact_lag_and_bit_identical_batches_in_every_kind(kind, start_method):
    got = _train(kind, n_workers=2, start_method=start_method)
    assert_runs_equal(got, _serial_reference())
    assert sum(len(b["traj_infos"]) for b in got) > 5


def test_lag_differs_from_no_lag_by_exactly_the_parameters():
    """The same loop without the lag: batch k acts with version k (the same envs, seeds and
    episode boundaries; only what depends on the parameters changes)."""
    agent = VersionAgent()
    with sampling.make_sampler("serial", ENV, agent, **SIZE) as s:
        for k, batch in enumerate(s.steps(3)):
            assert (batch.agent_info["version"] == k).all()
            agent.v += 1


@pytest.mark.parametrize("kind", ["serial", "cpu", "gpu"])
def test_the_next_batch_gets_the_next_itr(kind):
    agent = VersionAgent()
    extra = {} if kind == "serial" else dict(n_workers=2, start_method="fork")
    with sampling.make_sampler(kind, ENV, agent, policy_lag=1, **SIZE, **extra) as s:
        s.obtain_samples(10)
        s.obtain_samples(11)
    if kind != "gpu":  # gpu serves actions with a copy of the agent, which gets the calls
        assert agent.modes == [10, 11, 12]


@pytest.mark.parametrize("kind", ["cpu", "gpu", "alternating"])
def test_a_batch_stays_valid_while_the_next_is_collected(kind):
    env = functools.partial(SlowEnv, delay=0.002)
    with sampling.make_sampler(kind, env, CountingAgent(), policy_lag=1, n_workers=2,
                               start_method="fork", **SIZE) as s:
        it = s.steps()
        batch = next(it)
        held = snapshot(batch)
        time.sleep(0.3)  # the next batch (6 steps x 2 ms) is collected meanwhile
        assert_batches_equal(snapshot(batch), held)
        nxt = next(it)
        assert nxt.observation.tobytes() != held["observation"].tobytes()
        # ... and the next one continues it: CountingEnv's obs[2] is the step in the episode
        last, first = held["observation"][-1, :, 2], nxt.observation[0, :, 2]
        np.testing.assert_array_equal(first, np.where(held["done"][-1], 0, last + 1))


def _with_evaluations(kind, **kw) -> tuple:
    agent = VersionAgent()
    batches, evals = [], []
    with sampling.make_sampler(kind, ENV, agent, policy_lag=1, eval_n_envs=2,
                               eval_max_steps=20, **SIZE, **kw) as s:
        for k, batch in enumerate(s.steps(4)):
            batches.append(snapshot(batch))
            agent.v += 1
            if k % 2 == 0:  # evaluation with the parameters as they are now
                evals.append([t.stats() for t in s.evaluate_agent(k)])
    return batches, evals


@pytest.mark.parametrize("kind", PARALLEL)
def test_evaluation_between_batches_changes_nothing_in_flight(kind):
    ref = _with_evaluations("serial")
    got = _with_evaluations(kind, n_workers=2, start_method="fork")
    assert_runs_equal(got[0], ref[0])
    assert got[1] == ref[1] and ref[1][0]


# -- faults, Ctrl-C, shutdown: the fault matrix's paths with a batch in flight -------------
@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", PARALLEL)
def test_a_fault_while_the_caller_trains_surfaces_at_the_next_call(kind, start_method):
    # env 2 (env_id 3: seed=1) fails at its 9th step: in the second batch, collected while
    # the caller trains
    env = functools.partial(FaultEnv, where="step", after=8, fail_env=3)
    with sampling.make_sampler(kind, env, CountingAgent(), policy_lag=1, n_workers=2,
                               start_method=start_method, **SIZE) as s:
        it = s.steps()
        next(it)  # batch 0; batch 1 is collected from now on
        time.sleep(0.5)  # "training": the fault happens meanwhile
        t0 = time.monotonic()
        with pytest.raises(WorkerError) as ei:
            next(it)
        assert time.monotonic() - t0 < BOUND_S
        err = ei.value
        assert f"{kind} sampler: worker 1 (envs 2..3)" in str(err)
        assert "boom in step of env 3" in str(err) and "env 2, step 2 of the batch" in str(err)
        assert isinstance(err.__cause__, EnvFault) and "_inject_fault" in err.remote_traceback
        with pytest.raises(SamplerClosedError):
            s.obtain_samples()
    assert sampling_children() == []


@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", PARALLEL)
def test_ctrl_c_while_the_caller_trains_leaves_nothing(kind, start_method):
    env = functools.partial(SlowEnv, delay=0.05)  # a batch takes >= 0.3 s
    with pytest.raises(KeyboardInterrupt):
        with sampling.make_sampler(kind, env, CountingAgent(), policy_lag=1, n_workers=2,
                                   start_method=start_method, **SIZE) as s:
            with interrupt_after(0.1) as sent:
                next(s.steps())
                time.sleep(BOUND_S)  # "training" while the next batch is collected
    assert sent and time.monotonic() - sent[0] < BOUND_S
    assert sampling_children() == []


@pytest.mark.parametrize("kind", PARALLEL)
def test_ctrl_c_while_waiting_for_the_batch_in_flight(kind):
    env = functools.partial(SlowEnv, delay=0.2)  # a batch takes >= 1.2 s
    with sampling.make_sampler(kind, env, CountingAgent(), policy_lag=1, n_workers=2,
                               start_method="fork", **SIZE) as s:
        it = s.steps()
        next(it)
        with pytest.raises(KeyboardInterrupt):
            with interrupt_after(0.3) as sent:
                next(it)
        assert time.monotonic() - sent[0] < BOUND_S
        assert sampling_children() == []
        with pytest.raises(SamplerClosedError):
            s.obtain_samples()


@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", PARALLEL)
def test_shutdown_with_a_batch_in_flight_is_clean(kind, start_method):
    env = functools.partial(SlowEnv, delay=0.05)
    s = sampling.make_sampler(kind, env, CountingAgent(), policy_lag=1, n_workers=2,
                              start_method=start_method, shutdown_timeout=2.0, **SIZE)
    s.obtain_samples()  # the next batch is in flight now
    t0 = time.monotonic()
    s.shutdown()
    assert time.monotonic() - t0 < BOUND_S
    assert sampling_children() == []
    with pytest.raises(SamplerClosedError):
        s.obtain_samples()


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_a_worker_killed_while_the_caller_trains(kind):
    import os
    import signal
    with sampling.make_sampler(kind, functools.partial(SlowEnv, delay=0.01), CountingAgent(),
                               policy_lag=1, n_workers=2, start_method="fork", **SIZE) as s:
        it = s.steps()
        next(it)
        os.kill(worker_pid(kind, 1), signal.SIGKILL)
        with pytest.raises(WorkerError, match="worker 1 .* killed by signal SIGKILL"):
            next(it)


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("value, error", [(2, ValueError), (-1, ValueError), (True, TypeError),
                                          (1.0, TypeError), ("1", TypeError)])
def test_policy_lag_must_be_0_or_1(value, error):
    with pytest.raises(error, match="policy_lag"):
        sampling.make_sampler("serial", ENV, CountingAgent(), policy_lag=value, **SIZE)


class Uncopyable(VersionAgent):
    """Parameters, and something neither deepcopy nor pickle can copy."""

    def __init__(self):
        super().__init__()
        import threading
        self.lock = threading.Lock()


@pytest.mark.parametrize("kind", SERVED)
def test_an_agent_that_cannot_be_copied_is_refused_by_the_action_server_kinds(kind):
    with pytest.raises(TypeError, match="policy_lag=1 with an action-server kind serves "
                                        "actions from a copy of the agent"):
        sampling.make_sampler(kind, ENV, Uncopyable(), policy_lag=1, n_workers=2,
                              start_method="fork", **SIZE)
    # without the lag, or in the cpu kind (fork), the same agent is fine
    with sampling.make_sampler(kind, ENV, Uncopyable(), n_workers=2, start_method="fork",
                               **SIZE) as s:
        s.obtain_samples()


# -- state the copies hold: recurrent state, generators, closures, module globals ----------
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["serial"] + PARALLEL)
def test_recurrent_state_resets_at_every_episode_start_across_batches(kind, start_method):
    if kind == "serial" and start_method != "fork":
        pytest.skip("no workers")
    extra = {} if kind == "serial" else dict(n_workers=2, start_method=start_method)
    with sampling.make_sampler(kind, ENV, RecurrentCounter(), policy_lag=1, **SIZE,
                               **extra) as s:
        for batch in s.steps(6):  # episodes of 3, 4 and 5 steps end on batch boundaries too
            np.testing.assert_array_equal(batch.agent_info["count"],
                                          batch.observation[..., 2].astype(np.int64))


class OwnGenerator:
    """A stochastic agent with its own generator: reproducible with the lag in every kind
    (the action server's copy draws from its copy of the generator)."""

    def __init__(self):
        self.rng = np.random.default_rng(7)

    def step(self, observation, prev_action, prev_reward):
        return self.rng.integers(3, size=len(observation)), {}


@pytest.mark.parametrize("kind", ["gpu", "alternating"])
def test_a_stochastic_agent_with_its_own_generator_is_reproducible(kind):
    runs = []
    for _ in range(2):
        with sampling.make_sampler(kind, ENV, OwnGenerator(), policy_lag=1, n_workers=2,
                                   start_method="fork", **SIZE) as s:
            runs.append([snapshot(b) for b in s.steps(4)])
    assert_runs_equal(runs[0], runs[1])


def _closure_agent():
    weights = np.zeros(1)  # a float array the training loop updates, outside any module

    def policy(observation):
        return np.full(len(observation), int(weights[0]) % 3)
    return policy, weights


def test_a_closure_over_arrays_is_copied_and_the_copy_warned_about():
    policy, weights = _closure_agent()
    with pytest.warns(UserWarning, match="with policy_lag=1 this kind serves actions from a "
                                         "copy of the agent, and this agent holds float arrays"):
        s = sampling.make_sampler("gpu", ENV, policy, policy_lag=1, n_workers=2,
                                  start_method="fork", **SIZE)
    with s:
        for batch in s.steps(3):
            weights += 1  # the copy keeps its own (frozen) array, never a half-updated one
            assert (batch.action == 0).all()


NET = np.zeros(1)  # module-level state: every copy of a function reading it shares it


def global_policy(observation):
    return np.full(len(observation), int(NET[0]) % 3)


def test_an_agent_reading_module_globals_is_refused_with_the_reason():
    with pytest.raises(TypeError, match=r"cannot be copied apart from its state .* the copy "
                                        r"shares NET.*not module globals"):
        sampling.make_sampler("gpu", ENV, global_policy, policy_lag=1, n_workers=2,
                              start_method="fork", **SIZE)


# -- steps(n) and closing: no batch left collecting for nobody ----------------------------
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_steps_n_leaves_no_batch_in_flight_and_closing_is_prompt(kind):
    env = functools.partial(SlowEnv, delay=0.3)  # a batch takes >= 1.8 s
    with sampling.make_sampler(kind, env, CountingAgent(), policy_lag=1, n_workers=2,
                               start_method="fork", **SIZE) as s:
        t0 = time.monotonic()
        for _ in s.steps(1):
            pass
        took = time.monotonic() - t0
        assert s._flight is None
        assert took < 2 * 1.8 + BOUND_S  # the first call collects one batch, not two
        s.obtain_samples()  # now the next one is in flight: closing does not wait for it
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.5
    assert sampling_children() == []


def test_a_sampler_dropped_with_a_batch_in_flight_is_closed_at_once():
    import gc
    s = sampling.make_sampler("gpu", functools.partial(SlowEnv, delay=0.3), CountingAgent(),
                              policy_lag=1, n_workers=2, start_method="fork", **SIZE)
    s.obtain_samples()
    del s
    gc.collect()
    from tests.fault_helpers import wait_until
    assert wait_until(lambda: sampling_children() == [], BOUND_S)


@pytest.mark.parametrize("n, error", [(2.0, TypeError), (True, TypeError), (-1, ValueError)])
def test_steps_n_is_checked(n, error):
    with sampling.make_sampler("serial", ENV, CountingAgent(), **SIZE) as s:
        with pytest.raises(error, match="steps\\(n\\): n must be a non-negative int"):
            next(s.steps(n))
        assert len(list(s.steps(np.int64(2)))) == 2


def test_auto_with_policy_lag_picks_a_kind_that_can_overlap(two_usable_cpus):
    with sampling.make_sampler("auto", ENV, CountingAgent(), policy_lag=1, n_workers=2,
                               **SIZE) as s:
        assert s.kind != "serial"
        assert "policy_lag=1" in s.auto_reason
