"""Bad input raises a clear error (type and message) before any process starts; misuse of
a closed sampler raises SamplerClosedError; an env or agent that breaks the layout raises
an error naming the env and the field."""
from __future__ import annotations

import functools
import multiprocessing as mp
import multiprocessing.process
import threading

import numpy as np
import pytest

import sampling
from sampling import SamplerClosedError, WorkerError
from tests.helpers import (
    KINDS,
    PARALLEL,
    WORKER_AGENTS,
    CountingAgent,
    CountingEnv,
    ShapeChangingEnv,
    counting_policy,
    one_per,
)

GOOD = dict(batch_T=4, batch_B=2)


@pytest.fixture
def no_process_start(monkeypatch):
    """Fail the test if anything starts a process: validation comes first."""
    def refuse(self):
        raise AssertionError(f"process {self.name} started before validation finished")
    monkeypatch.setattr(mp.process.BaseProcess, "start", refuse)


def make(kind="cpu", env_fn=CountingEnv, agent=None, **kw):
    kw = dict(GOOD, **kw)
    if kind not in sampling.KINDS or sampling.KINDS[kind].workers:  # (an unknown kind too)
        kw.setdefault("start_method", "fork")
    return sampling.make_sampler(kind, env_fn, CountingAgent() if agent is None else agent, **kw)


# -- arguments ------------------------------------------------------------------------
def test_unknown_kind_lists_valid_kinds(no_process_start):
    with pytest.raises(ValueError, match=r"unknown sampler kind 'cpus'.*valid kinds: .*"
                                         r"alternating.*cpu.*gpu.*no_overlap_alternating.*"
                                         r"serial"):
        make("cpus")


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_keyword_is_type_error(kind, no_process_start):
    with pytest.raises(TypeError, match="batch_size"):
        make(kind, batch_size=3)
    with pytest.raises(TypeError, match="n_worker"):
        make(kind, n_worker=2)


BAD_SIZES = [
    (0, ValueError, r"must be >= 1, got 0"),
    (-3, ValueError, r"must be >= 1, got -3"),
    (2.0, TypeError, r"must be an int, got 2.0 \(float\)"),
    ("4", TypeError, r"must be an int, got '4' \(str\)"),
    (True, TypeError, r"must be an int, got True \(bool\)"),
    (False, TypeError, r"must be an int, got False \(bool\)"),
    (None, TypeError, r"must be an int, got None"),
]


@pytest.mark.parametrize("name,value,error,match", [
    pytest.param(name, *bad, id=f"{name}={bad[0]!r}")
    for name in ("batch_T", "batch_B", "n_workers") for bad in BAD_SIZES
    if not (name == "n_workers" and bad[0] is None)  # None: the default worker count
])
@pytest.mark.parametrize("kind", one_per("workers", "groups"))
def test_bad_sizes(kind, name, value, error, match, no_process_start):
    with pytest.raises(error, match=rf"^{name} {match}"):
        make(kind, **{name: value})


def test_numpy_integers_accepted():
    with make("serial", batch_T=np.int64(3), batch_B=np.int32(2)) as s:
        assert s.obtain_samples(0).action.shape == (3, 2)


@pytest.mark.parametrize("kw,error,match", [
    (dict(reset_mode="waiting"), ValueError,
     r"reset_mode must be one of 'mid_batch', 'wait', got 'waiting'"),
    (dict(reset_mode=None), ValueError, r"reset_mode must be one of"),
    (dict(seed=-1), ValueError, r"seed must be >= 0"),
    (dict(seed=1.5), TypeError, r"seed must be an int"),
    (dict(max_decorrelation_steps=-1), ValueError, r"max_decorrelation_steps must be >= 0"),
    (dict(discount=1.5), ValueError, r"discount must be a number in \[0, 1\], got 1.5"),
    (dict(discount="0.9"), ValueError, r"discount must be a number"),
    (dict(traj_info=3), TypeError, r"traj_info must be a TrajInfo subclass"),
    (dict(start_method="thread"), ValueError, r"start_method must be one of .*'thread'"),
    (dict(shutdown_timeout=-1), ValueError, r"shutdown_timeout must be a number >= 0"),
    (dict(eval_n_envs=2), ValueError,
     r"eval_n_envs > 0 needs a stopping rule: set eval_max_steps and/or "
     r"eval_max_trajectories"),
    (dict(eval_n_envs=-1), ValueError, r"eval_n_envs must be >= 0"),
    (dict(eval_n_envs=4, eval_max_steps=3), ValueError,
     r"eval_max_steps \(3\) .* must be >= eval_n_envs \(4\)"),
    (dict(eval_n_envs=1, eval_max_trajectories=0), ValueError,
     r"eval_max_trajectories must be >= 1"),
    (dict(eval_env_fn=5, eval_n_envs=1, eval_max_steps=5), TypeError,
     r"eval_env_fn must be a zero-argument callable or None"),
    (dict(cpu_affinity=[[]]), ValueError, r"cpu_affinity must be a list with one non-empty list"),
    (dict(cpu_affinity=[0, 1]), TypeError, r"cpu_affinity must be a list with one non-empty list"),
    (dict(cpu_affinity=[[100000]]), ValueError, r"cpu_affinity names CPUs \[100000\]"),
])
@pytest.mark.parametrize("kind", one_per("served"))
def test_bad_options(kind, kw, error, match, no_process_start):
    with pytest.raises(error, match=match):
        make(kind, **kw)


@pytest.mark.parametrize("env_fn", [CountingEnv(), "CartPole-v1", None])
def test_env_fn_not_callable(env_fn, no_process_start):
    with pytest.raises(TypeError, match=r"env_fn must be a zero-argument callable that returns "
                                        r"an env, got (CountingEnv|str|NoneType)"):
        make("cpu", env_fn=env_fn)


@pytest.mark.parametrize("agent", [object(), np.zeros(3), "policy"])
def test_agent_neither_callable_nor_step(agent, no_process_start):
    with pytest.raises(TypeError, match=r"agent must be a callable policy\(observation\) -> "
                                        r"action or an object with a step"):
        make("cpu", agent=agent)


@pytest.mark.parametrize("kind", KINDS)
def test_bootstrap_value_needs_agent_value(kind, no_process_start):
    with pytest.raises(TypeError, match=r"bootstrap_value=True needs an agent with a value"):
        make(kind, agent=counting_policy, bootstrap_value=True)


# -- pickling for spawn / forkserver ---------------------------------------------------
def _lock_env_fn():
    lock = threading.Lock()

    def env_fn():
        with lock:
            return CountingEnv()
    return env_fn


@pytest.mark.parametrize("method", [m for m in ("spawn", "forkserver")
                                    if m in mp.get_all_start_methods()])
@pytest.mark.parametrize("kind", PARALLEL)
def test_unpicklable_env_fn_rejected_for_spawn(kind, method, no_process_start):
    with pytest.raises(TypeError, match=r"env_fn cannot be pickled with cloudpickle .*"
                                        rf"{kind!r} kind.*start_method='fork'") as ei:
        make(kind, env_fn=_lock_env_fn(), start_method=method)
    assert ei.value.__cause__ is not None


@pytest.mark.parametrize("method", [m for m in ("spawn", "forkserver")
                                    if m in mp.get_all_start_methods()])
def test_unpicklable_agent_rejected_for_cpu_spawn(method, no_process_start):
    agent = CountingAgent()
    agent.lock = threading.Lock()
    with pytest.raises(TypeError, match=r"^agent cannot be pickled"):
        make("cpu", agent=agent, start_method=method)


def test_unpicklable_eval_env_fn_rejected_for_spawn(no_process_start):
    with pytest.raises(TypeError, match=r"^eval_env_fn cannot be pickled"):
        make("gpu", eval_env_fn=_lock_env_fn(), eval_n_envs=1, eval_max_steps=4,
             start_method="spawn")


@pytest.mark.parametrize("kind", PARALLEL)
def test_unpicklable_env_fn_fine_with_fork(kind, no_leaks):
    agent = CountingAgent()
    if kind in WORKER_AGENTS:
        agent.lock = threading.Lock()  # the cpu kind's agent goes to the workers too
    with make(kind, env_fn=_lock_env_fn(), agent=agent, start_method="fork") as s:
        b = s.obtain_samples(0)
        np.testing.assert_array_equal(b.observation[0, :, 0], [0, 1])


def test_served_kinds_never_pickle_the_agent(no_leaks):
    agent = CountingAgent()
    agent.lock = threading.Lock()  # stays in the parent in the action-server kinds
    with make("gpu", agent=agent, start_method="spawn") as s:
        assert s.obtain_samples(0).action.shape == (4, 2)


# -- agents that break the layout ------------------------------------------------------
def _wrong_count(observation):
    return np.zeros(len(observation) + 1, np.int64)


def _wrong_shape(observation):
    return np.zeros((len(observation), 2), np.int64)


class WrongCountLater:
    """Right at the probe (one env), wrong on a batch: returns one action too many."""

    def step(self, observation, prev_action, prev_reward):
        n = len(observation)
        return np.zeros(n if n == 1 else n + 1, np.int64), None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy,shape", [(_wrong_count, r"\(2,\)"), (_wrong_shape, r"\(1, 2\)")])
def test_agent_wrong_actions_rejected_at_probe(kind, policy, shape, no_process_start):
    with pytest.raises(ValueError, match=rf"the agent returned actions of shape {shape} for 1 "
                                         rf"env; expected \(1,\)"):
        make(kind, agent=policy)


def test_agent_not_returning_a_pair(no_process_start):
    class Bad:
        def step(self, observation, prev_action, prev_reward):
            return np.zeros(len(observation), np.int64)
    with pytest.raises(TypeError, match=r"agent.step must return \(action, agent_info\)"):
        make("serial", agent=Bad())


@pytest.mark.parametrize("kind", KINDS)
def test_agent_wrong_count_on_a_batch(kind, no_leaks):
    s = make(kind, agent=WrongCountLater(), batch_B=4, n_workers=2)
    if kind in WORKER_AGENTS:  # the workers' copies of the agent fail
        error = pytest.raises(WorkerError, match=r"worker \d \(envs \d\.\.\d\) raised "
                                                 r"ValueError:.*agent.step returned shape")
    else:  # the agent in this process fails
        error = pytest.raises(ValueError, match=r"envs 0\.\.\d .*agent.step returned shape "
                                                r"\(\d,\), expected \(\d,\)")
    with error:
        s.obtain_samples(0)
    with pytest.raises(SamplerClosedError):
        s.obtain_samples(1)


# -- envs that break the layout --------------------------------------------------------
@pytest.mark.parametrize("change,got", [("shape", r"shape \(5,\) dtype float32"),
                                        ("dtype", r"shape \(4,\) dtype float64"),
                                        ("broadcast", r"shape \(1,\) dtype float32"),
                                        ("list", r"shape \(4,\) dtype float64"),
                                        ("none", r"shape \(\) dtype object")])
def test_shape_changing_env_serial(change, got):
    env_fn = functools.partial(ShapeChangingEnv, bad_env=1, at=2, change=change)
    s = make("serial", env_fn=env_fn)
    with pytest.raises(ValueError, match=rf"env 1 \(serial sampler\) returned observation with "
                                         rf"{got} at step 1 of the batch, expected shape \(4,\) "
                                         rf"dtype float32"):
        s.obtain_samples(0)
    with pytest.raises(SamplerClosedError, match="closed"):
        s.obtain_samples(1)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", one_per("groups", kinds=PARALLEL))
def test_shape_changing_env_parallel(kind, method, no_leaks):
    env_fn = functools.partial(ShapeChangingEnv, bad_env=3, at=2, change="shape")
    s = make(kind, env_fn=env_fn, batch_B=4, n_workers=2, start_method=method)
    with pytest.raises(WorkerError, match=r"worker 1 \(envs 2\.\.3\) raised ValueError: env 3 "
                                          r"\(worker 1\) returned observation with shape "
                                          r"\(5,\)") as ei:
        s.obtain_samples(0)
    assert ei.value.worker == 1 and ei.value.envs == [2, 3]
    assert "observation" in ei.value.remote_traceback
    with pytest.raises(SamplerClosedError):
        s.obtain_samples(1)


def test_shape_changing_dict_env_names_the_field():
    from tests.helpers import DictObsEnv

    class BadImg(DictObsEnv):
        def _obs(self, action=0):
            o = super()._obs(action)
            if self.env_id == 1 and self.t >= 1:
                o["img"] = o["img"].astype(np.float32)
            return o

    s = make("serial", env_fn=BadImg)
    with pytest.raises(ValueError, match=r"env 1 .*returned observation\['img'\] with shape "
                                         r"\(2, 3\) dtype float32 at step 0 of the batch, "
                                         r"expected shape \(2, 3\) dtype uint8"):
        s.obtain_samples(0)
    s.shutdown()


# -- closed samplers -------------------------------------------------------------------
def test_evaluate_agent_without_eval_envs():
    with make("serial") as s:
        with pytest.raises(ValueError, match=r"evaluate_agent needs eval envs: pass "
                                             r"eval_n_envs > 0"):
            s.evaluate_agent(0)
        s.obtain_samples(0)  # a usage error does not close the sampler


@pytest.mark.parametrize("kind", KINDS)
def test_closed_sampler_raises_and_shutdown_is_idempotent(kind, no_leaks):
    s = make(kind, n_workers=2, eval_n_envs=2, eval_max_trajectories=1)
    s.obtain_samples(0)
    s.shutdown()
    s.shutdown()
    assert "closed" in repr(s)
    for call in (lambda: s.obtain_samples(1), lambda: next(s.steps(1)),
                 lambda: s.evaluate_agent(0)):
        with pytest.raises(SamplerClosedError, match=rf"the {kind} sampler is closed \(shut "
                                                     rf"down\); make a new one"):
            call()
    with s:  # entering and leaving a closed sampler is harmless
        pass
    s.shutdown()


@pytest.mark.parametrize("kind", one_per("workers"))
def test_context_manager_closes(kind, no_leaks):
    with make(kind, n_workers=2) as s:
        s.obtain_samples(0)
    with pytest.raises(SamplerClosedError):
        s.obtain_samples(1)
    s.close()  # alias, still idempotent


def test_context_manager_closes_on_exception(no_leaks):
    with pytest.raises(KeyError):
        with make("gpu", n_workers=2) as s:
            s.obtain_samples(0)
            raise KeyError("user code failed")
    with pytest.raises(SamplerClosedError):
        s.obtain_samples(1)


# -- traj_info and cpu_affinity are checked up front -----------------------------------
class _ExtraTraj(sampling.TrajInfo):
    def __init__(self, discount=0.99, extra=0):
        super().__init__(discount)
        self.Extra = extra


class _DuckTraj:
    """Not a TrajInfo subclass, but has what the collector calls."""

    def __init__(self, discount):
        self.Length = 0

    def update(self, segment):
        self.Length += len(segment)

    def terminate(self, final_observation):
        return self

    def stats(self):
        return {"Length": self.Length}


class _NoStats:
    def __init__(self, discount):
        pass

    def update(self, segment):
        pass

    def terminate(self, final_observation):
        return self


def _no_discount():
    return sampling.TrajInfo()


def _failing_factory(discount):
    raise ZeroDivisionError("stats factory broke")


TRAJ_HEAD = r"^traj_info must be a TrajInfo subclass \(or a callable accepting discount= "
TRAJ_FIX = r"pass traj_info=sampling\.TrajInfo, a subclass of it, or a factory"


@pytest.mark.parametrize("traj_info,match", [
    pytest.param(int, rf"{TRAJ_HEAD}.*got <class 'int'>: traj_info\(discount=0\.99\) raised "
                      rf"TypeError: .*discount.*; {TRAJ_FIX}", id="int"),
    pytest.param(3, rf"{TRAJ_HEAD}.*got 3; {TRAJ_FIX}", id="3"),
    pytest.param(sampling.TrajInfo(), rf"{TRAJ_HEAD}.*got TrajInfo\(Length=0.*\), an instance; "
                                      r"pass the class itself: traj_info=TrajInfo",
                 id="instance"),
    pytest.param(_no_discount, rf"{TRAJ_HEAD}.*got <function _no_discount .*raised TypeError: "
                               rf".*unexpected keyword argument 'discount'; {TRAJ_FIX}",
                 id="no-discount"),
    pytest.param(dict, rf"{TRAJ_HEAD}.*got <class 'dict'>: traj_info\(discount=0\.99\) "
                       r"returned \{'discount': 0\.99\} \(dict\), which has no "
                       r"terminate\(final_observation\), stats\(\) methods", id="dict"),
    pytest.param(_NoStats, rf"{TRAJ_HEAD}.*returned .*\(_NoStats\), which has no stats\(\) "
                           rf"method; {TRAJ_FIX}", id="no-stats"),
    pytest.param(_failing_factory, rf"{TRAJ_HEAD}.*raised ZeroDivisionError: stats factory "
                                   rf"broke; {TRAJ_FIX}", id="raises"),
])
@pytest.mark.parametrize("kind", one_per("driver"))
def test_bad_traj_info(kind, traj_info, match, no_process_start):
    with pytest.raises(TypeError, match=match):
        make(kind, traj_info=traj_info)


@pytest.mark.parametrize("traj_info,cls", [
    (sampling.TrajInfo, sampling.TrajInfo),
    (_ExtraTraj, _ExtraTraj),
    (functools.partial(_ExtraTraj, extra=7), _ExtraTraj),
    (_DuckTraj, _DuckTraj),
])
@pytest.mark.parametrize("kind", one_per("workers"))
def test_good_traj_info(kind, traj_info, cls, no_leaks):
    with make(kind, traj_info=traj_info, batch_T=8, n_workers=2) as s:
        trajs = s.obtain_samples(0).traj_infos
    assert trajs and all(type(t) is cls for t in trajs)
    assert all(t.stats()["Length"] > 0 for t in trajs)
    if isinstance(traj_info, functools.partial):
        assert all(t.Extra == 7 for t in trajs)


AFF = (r"^cpu_affinity must be a list with one non-empty list of CPU ids \(ints >= 0\) per "
       r"worker, e\.g\. cpu_affinity=\[\[0\], \[1\]\] pins worker 0 to CPU 0 and worker 1 to "
       r"CPU 1; ")


@pytest.mark.parametrize("spec,error,match", [
    ([[0.7]], TypeError, rf"{AFF}cpu_affinity\[0\]\[0\] is 0\.7 \(float\), not an int$"),
    ([["1"]], TypeError, rf"{AFF}cpu_affinity\[0\]\[0\] is '1' \(str\), not an int$"),
    ([[0], [True]], TypeError, rf"{AFF}cpu_affinity\[1\]\[0\] is True \(bool\), not an int"),
    ([[0, 1.0]], TypeError, rf"{AFF}cpu_affinity\[0\]\[1\] is 1\.0 \(float\)"),
    ([{0}, {0.5}], TypeError, rf"{AFF}an entry of cpu_affinity\[1\] is 0\.5 \(float\)"),
    (np.array([[0.0]]), TypeError, rf"{AFF}cpu_affinity\[0\]\[0\] is 0\.0 \(float\)"),
    ("01", TypeError, rf"{AFF}got '01' \(str\)$"),
    (b"01", TypeError, rf"{AFF}got b'01' \(bytes\)$"),
    (0, TypeError, rf"{AFF}got 0 \(int\)$"),
    ({0: [0]}, TypeError, rf"{AFF}got \{{0: \[0\]\}} \(dict\)$"),
    ([0, 1], TypeError, rf"{AFF}cpu_affinity\[0\] is 0 \(int\), not a list of CPU ids"),
    ([[0], "1"], TypeError, rf"{AFF}cpu_affinity\[1\] is '1' \(str\), not a list"),
    ([], ValueError, rf"{AFF}got \[\]$"),
    ([[0], []], ValueError, rf"{AFF}cpu_affinity\[1\] is \[\]$"),
    ([[-1]], ValueError, rf"{AFF}cpu_affinity\[0\]\[0\] is -1, not >= 0$"),
    ([[0], [100000]], ValueError, r"^cpu_affinity names CPUs \[100000\] that this process may "
                                  r"not use"),
])
@pytest.mark.parametrize("kind", one_per("workers"))
def test_bad_cpu_affinity(kind, spec, error, match, no_process_start):
    import os

    if "100000" in match and not hasattr(os, "sched_getaffinity"):
        pytest.skip("the usable CPUs are only known with sched_getaffinity")
    with pytest.raises(error, match=match):
        make(kind, cpu_affinity=spec)


def test_cpu_affinity_accepted_forms(no_process_start):
    import os

    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    for spec in ([[cpu]], [(cpu,)], ((cpu, cpu),), [{cpu}], [range(cpu, cpu + 1)],
                 np.array([[cpu]]), [np.array([cpu])], [[np.int64(cpu)]]):
        s = make("serial", cpu_affinity=spec)
        assert s._opts.cpu_affinity == [[cpu]], spec
        s.shutdown()
