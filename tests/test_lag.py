"""policy_lag=1: the next batch is collected while the caller trains on this one, with the
parameters exactly one update behind, in every kind and start method; batches stay valid
until the next call; evaluation, faults, Ctrl-C and shutdown with a batch in flight.
"""
from __future__ import annotations

import functools
import os
import time

import numpy as np
import pytest

import sampling
from sampling import SamplerClosedError, WorkerError
from tests.fault_helpers import (
    ctrl_c_raises,
    interrupt_after,
    interrupt_main_thread,
    sampling_children,
    wait_until,
    worker_pid,
)
from tests.helpers import (
    ALL_METHODS,
    KINDS,
    PARALLEL,
    SERVED,
    CountingAgent,
    CountingEnv,
    EnvFault,
    FaultEnv,
    IdTraj,
    RecurrentCounter,
    SlowEnv,
    StepLogEnv,
    assert_batches_equal,
    assert_runs_equal,
    open_gate,
    read_step_log,
    snapshot,
    with_methods,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

BOUND_S = 5.0  # a fault or a Ctrl-C must surface within this many seconds
ENV = functools.partial(CountingEnv, lengths=(3, 5, 4))
SIZE = dict(batch_T=6, batch_B=4, seed=1, traj_info=IdTraj, final_observation=True)
T, B = SIZE["batch_T"], SIZE["batch_B"]
ENV_IDS = [SIZE["seed"] + b for b in range(B)]  # CountingEnv's env id is its seed
# How long a test waits for a batch collected in the background (a few ms of work): a
# bound for a loaded machine, never a nominal time.
COLLECT_BOUND_S = 30.0
# Without the lag nothing may step while the caller holds its batch: how long it holds.
NO_LAG_HOLD_S = 0.5
# A step that takes this long never returns within the test: closing the sampler must not
# wait for it (BOUND_S is far shorter). Also the shutdown_timeout of those tests, so that a
# close that waited for the batch (and then forced it) could not pass either.
NEVER_S = 60.0


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


# cpu's copies get the parameters mirrored through shared memory: under every start method
# (spawn's copies are unpickled, fork's inherited); the other kinds under METHODS.
LAG_CASES = ([pytest.param("cpu", m, marks=pytest.mark.start_method_matters)
              for m in ALL_METHODS]
             + [(k, m) for k, m in with_methods([k for k in PARALLEL if k != "cpu"])])


@pytest.mark.parametrize("kind,start_method", LAG_CASES)
def test_exact_lag_and_bit_identical_batches_in_every_kind(kind, start_method):
    got = _train(kind, n_workers=2, start_method=start_method)
    assert_runs_equal(got, _serial_reference())
    assert sum(len(b["traj_infos"]) for b in got) > 5


def _no_lag(versions) -> list:
    """Serial batches without the lag, batch k acting with parameter version
    ``versions[k]`` (set by the "update" after batch k-1)."""
    agent = VersionAgent()
    out = []
    with sampling.make_sampler("serial", ENV, agent, bootstrap_value=True, **SIZE) as s:
        for k, batch in enumerate(s.steps(len(versions))):
            assert (batch.agent_info["version"] == versions[k]).all(), (k, batch.agent_info)
            out.append(snapshot(batch))
            agent.v[:] = versions[k + 1] if k + 1 < len(versions) else -1
    return out


def test_lag_differs_from_no_lag_by_exactly_the_parameters():
    """The same loop without the lag acts with version k in batch k; given instead the
    parameters the lag run acted with (one update behind: 0, 0, 1, 2, ...), it collects
    the lag run's batches bit for bit (the same envs, seeds and episode boundaries: only
    the parameters differ)."""
    lagged = _serial_reference()
    n = len(lagged)
    plain = _no_lag(list(range(n)))
    assert_runs_equal(_no_lag([max(k - 1, 0) for k in range(n)]), lagged)
    assert_batches_equal(plain[0], lagged[0], "batch 0")  # both act with version 0
    for k in range(1, n):  # with version k instead of k - 1, the actions differ
        assert plain[k]["action"].tobytes() != lagged[k]["action"].tobytes(), k
        for field in ("reward", "done", "terminated", "truncated"):  # the env's own course
            assert plain[k][field].tobytes() == lagged[k][field].tobytes(), (k, field)


class ItrAgent(VersionAgent):
    """agent_info["itr"]: the ``sample_mode`` itr of the copy that acted."""

    itr = -1

    def sample_mode(self, itr):
        super().sample_mode(itr)
        self.itr = itr

    def step(self, observation, prev_action, prev_reward):
        action, info = super().step(observation, prev_action, prev_reward)
        info["itr"] = np.full(len(observation), self.itr, np.int64)
        return action, info


@pytest.mark.parametrize("kind", KINDS)
def test_the_next_batch_gets_the_next_itr(kind):
    """obtain_samples(itr) returns the batch collected since the previous call and starts
    the next one, whose sample_mode gets itr + 1 (README): batches acted with itrs 10,
    11 (started by the call with 10), 21 (started by the call with 20)."""
    agent = ItrAgent()
    extra = {} if kind == "serial" else dict(n_workers=2, start_method="fork")
    with sampling.make_sampler(kind, ENV, agent, policy_lag=1, **SIZE, **extra) as s:
        itrs = [np.unique(s.obtain_samples(itr).agent_info["itr"]).tolist()
                for itr in (10, 20, 30)]
    assert itrs == [[10], [11], [21]]
    if not sampling.KINDS[kind].served:  # served kinds act with a copy, which gets the calls
        assert agent.modes == [10, 11, 21, 31]


# -- the overlap itself: batch k+1 is collected while the caller holds batch k -------------
def _steps_of(log: dict, k: int, what: str) -> list:
    """The times at which the steps of batch k began or ended ("begin"/"end"), for every
    env (its steps k*T+1 .. (k+1)*T; None where not logged)."""
    return [log.get((e, n, what)) for e in ENV_IDS for n in range(k * T + 1, (k + 1) * T + 1)]


def _gated(log_dir, **kw):
    """StepLogEnvs whose batch k steps once the test opens gate k (and batch 0 at once)."""
    open_gate(log_dir, 0)
    return functools.partial(StepLogEnv, str(log_dir), gate_every=T, safe_pid=os.getpid(),
                             lengths=(3, 5, 4), **kw)


def _hold(log_dir, k: int, policy_lag: int) -> tuple:
    """The caller holds batch k: it lets batch k+1's steps go (opens their gate) and,
    with the lag, waits until the whole of batch k+1 has been collected; without it, it
    holds NO_LAG_HOLD_S. Returns when it began and ended holding."""
    held_from = time.monotonic()
    open_gate(log_dir, k + 1)
    if policy_lag:
        assert wait_until(lambda: None not in _steps_of(read_step_log(log_dir), k + 1, "end"),
                          COLLECT_BOUND_S), f"batch {k + 1} was not collected while the " \
                                            f"caller held batch {k}"
    else:
        time.sleep(NO_LAG_HOLD_S)
    return held_from, time.monotonic()


@pytest.mark.parametrize("policy_lag", [0, 1])
@pytest.mark.parametrize("kind", PARALLEL)
def test_the_next_batch_is_collected_while_the_caller_holds_this_one(kind, policy_lag,
                                                                     tmp_path):
    """Steps log their wall-clock times; the steps of batch k+1 may only begin once the
    caller holds batch k (their gate). With policy_lag=1 all of them begin and end while
    the caller holds batch k (it never calls the sampler meanwhile); without it none
    happens then: they all come after the caller asks for batch k+1."""
    with sampling.make_sampler(kind, _gated(tmp_path), CountingAgent(), policy_lag=policy_lag,
                               n_workers=2, start_method="fork", **SIZE) as s:
        it = s.steps(3)
        next(it)
        for k in (0, 1):
            held_from, held_until = _hold(tmp_path, k, policy_lag)
            log = read_step_log(tmp_path)
            times = _steps_of(log, k + 1, "begin") + _steps_of(log, k + 1, "end")
            if policy_lag:
                assert all(held_from <= t <= held_until for t in times), (held_from, times)
            else:
                assert times == [None] * (2 * T * B), f"batch {k + 1} stepped before it " \
                                                      f"was asked for"
            next(it)
            if not policy_lag:
                begun = _steps_of(read_step_log(tmp_path), k + 1, "begin")
                assert all(t > held_until for t in begun), (held_until, begun)


@pytest.mark.parametrize("kind", PARALLEL)
def test_a_batch_stays_valid_while_the_next_is_collected(kind, tmp_path):
    with sampling.make_sampler(kind, _gated(tmp_path), CountingAgent(), policy_lag=1,
                               n_workers=2, start_method="fork", **SIZE) as s:
        it = s.steps()
        batch = next(it)
        held = snapshot(batch)
        _hold(tmp_path, 0, policy_lag=1)  # the next batch is collected meanwhile, in full
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
@pytest.mark.parametrize("kind,start_method", with_methods(PARALLEL))
def test_a_fault_while_the_caller_trains_surfaces_at_the_next_call(kind, start_method,
                                                                  tmp_path):
    # env 2 (env_id 3: seed=1) fails at its 9th step: in the second batch, collected while
    # the caller trains
    stamp = tmp_path / "fault_time"
    env = functools.partial(FaultEnv, where="step", after=8, fail_env=3, stamp=str(stamp))
    with sampling.make_sampler(kind, env, CountingAgent(), policy_lag=1, n_workers=2,
                               start_method=start_method, **SIZE) as s:
        it = s.steps()
        next(it)  # batch 0; batch 1 is collected from now on
        # "training": the fault happens meanwhile (the env stamps the time as it fails)
        assert wait_until(stamp.exists, COLLECT_BOUND_S)
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


@pytest.mark.parametrize("kind,start_method", with_methods(PARALLEL))
def test_ctrl_c_while_the_caller_trains_leaves_nothing(kind, start_method, tmp_path):
    """The Ctrl-C lands in the caller's update on batch 0 while batch 1 is in flight: an
    env is inside a step of batch 1 (logged), a step that would take NEVER_S."""
    env = functools.partial(StepLogEnv, str(tmp_path), delay=NEVER_S, slow_from=T + 1,
                            safe_pid=os.getpid(), lengths=(3, 5, 4))
    with pytest.raises(KeyboardInterrupt):
        with sampling.make_sampler(kind, env, CountingAgent(), policy_lag=1, n_workers=2,
                                   start_method=start_method, shutdown_timeout=NEVER_S,
                                   **SIZE) as s:
            next(s.steps())
            # the update: batch 1 is being collected meanwhile; Ctrl-C once a step of it runs
            assert wait_until(lambda: any(_steps_of(read_step_log(tmp_path), 1, "begin")),
                              COLLECT_BOUND_S)
            with ctrl_c_raises():
                sent = time.monotonic()
                interrupt_main_thread()
                time.sleep(BOUND_S)  # the rest of the update
    assert time.monotonic() - sent < BOUND_S  # shutdown included
    assert not any(_steps_of(read_step_log(tmp_path), 1, "end")), "batch 1 was not in flight"
    assert sampling_children() == []  # and no_leaks: nothing in /dev/shm, no process


@pytest.mark.parametrize("kind", PARALLEL)
def test_ctrl_c_while_waiting_for_the_batch_in_flight(kind):
    env = functools.partial(SlowEnv, delay=0.1)  # a batch takes >= 0.6 s
    with sampling.make_sampler(kind, env, CountingAgent(), policy_lag=1, n_workers=2,
                               start_method="fork", **SIZE) as s:
        it = s.steps()
        next(it)
        with pytest.raises(KeyboardInterrupt):
            with interrupt_after(0.15) as sent:
                next(it)
        assert time.monotonic() - sent[0] < BOUND_S
        assert sampling_children() == []
        with pytest.raises(SamplerClosedError):
            s.obtain_samples()


@pytest.mark.parametrize("kind,start_method", with_methods(PARALLEL))
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
@pytest.mark.start_method_matters  # the copies: inherited (fork) or unpickled (spawn)
@pytest.mark.parametrize("kind,start_method", [("serial", None)]
                         + [(k, m) for k in PARALLEL for m in ("fork", "spawn")
                            if m in ALL_METHODS])
def test_recurrent_state_resets_at_every_episode_start_across_batches(kind, start_method):
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
def _slow_from_batch_2(log_dir):
    """Batches 0 and 1 are quick; batch 2's steps take NEVER_S."""
    return functools.partial(StepLogEnv, str(log_dir), delay=NEVER_S, slow_from=2 * T + 1,
                             safe_pid=os.getpid(), lengths=(3, 5, 4))


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_steps_n_leaves_no_batch_in_flight_and_closing_is_prompt(kind, tmp_path):
    with sampling.make_sampler(kind, _slow_from_batch_2(tmp_path), CountingAgent(),
                               policy_lag=1, n_workers=2, start_method="fork",
                               shutdown_timeout=NEVER_S, **SIZE) as s:
        for _ in s.steps(1):
            pass
        assert s._flight is None
        time.sleep(NO_LAG_HOLD_S)  # a batch 1 started by steps(1) would be stepping now
        assert not any(_steps_of(read_step_log(tmp_path), 1, "begin")), "steps(1) started " \
                                                                          "a second batch"
        s.obtain_samples()  # batch 1, and batch 2 in flight: closing does not wait for it
        assert wait_until(lambda: any(_steps_of(read_step_log(tmp_path), 2, "begin")),
                          COLLECT_BOUND_S)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < BOUND_S  # not NEVER_S
    assert not any(_steps_of(read_step_log(tmp_path), 2, "end"))
    assert sampling_children() == []


def test_a_sampler_dropped_with_a_batch_in_flight_is_closed_at_once(tmp_path):
    import gc
    s = sampling.make_sampler("gpu", _slow_from_batch_2(tmp_path), CountingAgent(),
                              policy_lag=1, n_workers=2, start_method="fork",
                              shutdown_timeout=NEVER_S, **SIZE)
    s.obtain_samples()
    s.obtain_samples()  # batch 2 in flight, its steps take NEVER_S
    assert wait_until(lambda: any(_steps_of(read_step_log(tmp_path), 2, "begin")),
                      COLLECT_BOUND_S)
    del s
    gc.collect()
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
