"""Never hang, never leak: faults, interrupts and bad input, for every parallel kind and
start method.

``test_fault_matrix`` provokes each worker fault (an exception in env_fn, reset,
decorrelation, step, evaluation or the worker's agent; a worker that os._exit()s or is
SIGKILLed at construction, mid-step, between batches or during evaluation) for every
kind and start method. Each case checks the error (type, message, cause chain), the
time from the fault to the parent's raise, that the sampler is closed afterwards, and
that nothing is left behind: no /dev/shm entry (segment or named semaphore) created by
the sampler, no worker process alive. Separate tests cover the parent's agent raising,
KeyboardInterrupt (from the agent, a signal, a Ctrl-C to the process group), slow envs,
exceptions that do not pickle, bad env/agent output, and, in subprocesses,
resource-tracker warnings at exit and a SIGKILL of the parent itself.

/dev/shm is shared with whatever else runs on the machine, so the leak check compares
before/after only for the names the watched samplers created (recorded by the ``no_leaks``
fixture's LeakWatch, tests/conftest.py, patching SharedMemory and SemLock in this process).
The kinds are the parallel rows of ``sampling.KINDS`` (tests/helpers.py).
"""
from __future__ import annotations

import functools
import gc
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import sampling
from sampling import RemoteTraceback, SamplerClosedError, WorkerError
from tests.fault_helpers import (
    CTRL_C_RAISES,
    RECORD_NAMES,
    ROOT,
    SCRIPT_TIMEOUT_S,
    AgentFault,
    BadShapeAgent,
    ParentFaultAgent,
    TrainingError,
    WorkerFaultAgent,
    interrupt_after,
    locked_error,
    read_until_ready,
    sampling_children,
    script_env,
    sys_exit,
    two_arg_error,
    wait_until,
    worker_pid,
)
from tests.helpers import (
    ALL_METHODS,
    METHODS_AND_SMOKE,
    PARALLEL,
    SERVED,
    WORKER_AGENTS,
    CountingAgent,
    CountingEnv,
    EnvFault,
    FaultEnv,
    ShapeChangingEnv,
    SlowEnv,
    alive,
    descendants,
    kill_all,
    one_per,
    read_stamp,
    shm_entries,
    with_methods,
    write_stamp,
)

BOUND_S = 5.0  # a fault must reach the parent within this many seconds
SMALL = dict(batch_T=10, batch_B=4, n_workers=2)
PER_DRIVER = one_per("driver", kinds=PARALLEL)  # one parallel kind per way of driving workers


def _assert_closed(sampler) -> None:
    with pytest.raises(SamplerClosedError, match="closed"):
        sampler.obtain_samples(0)
    with pytest.raises(SamplerClosedError, match="closed"):
        next(sampler.steps(1))
    with pytest.raises(SamplerClosedError, match="closed"):
        sampler.evaluate_agent(0)
    sampler.shutdown()  # idempotent
    assert "closed" in repr(sampler)


# -- the worker-fault matrix ------------------------------------------------------------------
# fault: (phase, what the env/agent does, how the parent should describe it)
#   phase "construct": make_sampler raises; "batch": obtain_samples raises on a later batch;
#   "eval": evaluate_agent raises; "between": the test SIGKILLs worker 1 between two batches.
FAULTS = {
    "init": ("construct", dict(where="init"), "env_fn() for env 2"),
    "reset": ("construct", dict(where="reset"), "the first reset of env 3"),
    "decorrelation": ("construct", dict(where="step", after=3), "decorrelation of env 3"),
    "step": ("batch", dict(where="step", after=15), "env 3, step 5 of the batch"),
    "eval": ("eval", dict(where="step", after=2, fail_env=5), None),  # see test_eval_fault_*
    "worker_agent": ("batch", None, None),
    "kill_init": ("construct", dict(where="init", how="kill"), None),
    "exit_step": ("batch", dict(where="step", after=15, how="exit"), None),
    "kill_step": ("batch", dict(where="step", after=15, how="kill"), None),
    "kill_between": ("between", None, None),
    "kill_eval": ("eval", dict(where="step", after=2, fail_env=5, how="kill"), None),
}
RAISES = ("init", "reset", "decorrelation", "step", "eval", "worker_agent")
EXITCODE = {"kill_init": -9, "exit_step": 3, "kill_step": -9, "kill_between": -9, "kill_eval": -9}


def _run_fault(kind, method, fault, tmp_path) -> dict:
    """Provoke ``fault``; return what the parent raised (as plain data) and when."""
    phase, env_kw, _ = FAULTS[fault]
    stamp = str(tmp_path / "fault_time")
    pid = os.getpid()
    env_fn, eval_env_fn = CountingEnv, None
    agent = CountingAgent()
    kw = dict(SMALL, start_method=method)
    if fault == "worker_agent":
        agent = WorkerFaultAgent(fail_env=3, after=12, safe_pid=pid, stamp=stamp)
    elif phase == "eval":
        eval_env_fn = functools.partial(FaultEnv, stamp=stamp, safe_pid=pid, **env_kw)
    elif env_kw is not None:
        env_fn = functools.partial(FaultEnv, stamp=stamp, safe_pid=pid, **env_kw)
    if fault == "decorrelation":
        kw["max_decorrelation_steps"] = 20  # env 3 takes 11 random steps with seed 0
    if phase == "eval":
        kw.update(eval_env_fn=eval_env_fn, eval_n_envs=2, eval_max_steps=40)

    sampler = None
    out: dict = {}
    try:
        if phase == "construct":
            with pytest.raises(WorkerError) as ei:
                sampler = sampling.make_sampler(kind, env_fn, agent, **kw)
        else:
            sampler = sampling.make_sampler(kind, env_fn, agent, **kw)
            with pytest.raises(WorkerError) as ei:
                if phase == "batch":
                    for _ in range(3):
                        sampler.obtain_samples(0)
                elif phase == "eval":
                    sampler.obtain_samples(0)
                    sampler.evaluate_agent(0)
                else:  # between
                    sampler.obtain_samples(0)
                    victim = worker_pid(kind, 1)
                    write_stamp(stamp)
                    os.kill(victim, signal.SIGKILL)
                    sampler.obtain_samples(1)
        raised_at = time.monotonic()
        err = ei.value
        cause = err.__cause__
        out = dict(elapsed=raised_at - read_stamp(stamp), msg=str(err), type=type(err),
                   worker=err.worker, envs=err.envs, exitcode=err.exitcode,
                   remote_traceback=err.remote_traceback, cause=cause,
                   cause_type=type(cause), cause_msg=str(cause),
                   cause_cause=cause.__cause__ if cause is not None else None)
        if sampler is not None:
            _assert_closed(sampler)
            out["closed_checked"] = True
    finally:
        if sampler is not None:
            sampler.shutdown()
    return out


def _fault_cases() -> list:
    """(kind, start method, fault): a fault at construction under every start method (the
    workers are starting: names exist, the start method's machinery is at work); the others
    (workers started, names gone) under METHODS. The worker's own agent fails only in the
    kinds whose workers run one (the parent's agent: test_parent_agent_*)."""
    out = []
    for fault, (phase, _, _) in FAULTS.items():
        kinds = WORKER_AGENTS if fault == "worker_agent" else PARALLEL
        if phase == "construct":
            out += [pytest.param(k, m, fault, marks=pytest.mark.start_method_matters)
                    for k in kinds for m in ALL_METHODS]
        else:
            out += [(k, m, fault) for k, m in with_methods(kinds, key=fault)]
    return out


@pytest.mark.parametrize("kind,start_method,fault", _fault_cases())
def test_fault_matrix(kind, start_method, fault, tmp_path, no_leaks):
    phase, _, where = FAULTS[fault]
    r = _run_fault(kind, start_method, fault, tmp_path)

    assert r["type"] is WorkerError
    head = f"{kind} sampler: worker 1 (envs 2..3"
    assert head in r["msg"]
    assert r["worker"] == 1 and list(r["envs"]) == [2, 3]
    assert r["elapsed"] < BOUND_S, f"the fault reached the parent after {r['elapsed']:.2f}s"
    if fault in RAISES:
        want = AgentFault if fault == "worker_agent" else EnvFault
        assert r["cause_type"] is want
        assert "boom" in r["cause_msg"]
        assert f"raised {want.__name__}: " in r["msg"] and "boom" in r["msg"]
        if where is not None:
            assert where in r["msg"]
        rt = r["cause_cause"]
        assert isinstance(rt, RemoteTraceback)
        fn = "_agent_fault" if fault == "worker_agent" else "_inject_fault"
        assert fn in rt.tb and want.__name__ in rt.tb
        if fault == "decorrelation":
            assert "_decorrelate" in rt.tb
        assert r["remote_traceback"] == rt.tb
        assert r["exitcode"] is None
    else:
        code = EXITCODE[fault]
        assert r["exitcode"] == code
        if code < 0:
            assert "killed by signal SIGKILL" in r["msg"]
        else:
            assert f"exited with code {code}" in r["msg"]
        assert r["cause"] is None and r["remote_traceback"] is None
    assert r.get("closed_checked", False) == (phase != "construct")
    del r
    no_leaks.assert_clean()


# -- exceptions that do not travel well, and bad env output --------------------------------------
def _step_fault(kind, tmp_path, exc, match) -> WorkerError:
    """Env 3 raises ``exc(message)`` in a step of the first batches: the WorkerError, which
    must match ``match`` and reach the parent within BOUND_S, leaving no worker running and
    the sampler closed."""
    stamp = str(tmp_path / "fault_time")
    env_fn = functools.partial(FaultEnv, after=15, stamp=stamp, safe_pid=os.getpid(), exc=exc)
    with sampling.make_sampler(kind, env_fn, CountingAgent(), start_method="fork",
                               **SMALL) as sampler:
        with pytest.raises(WorkerError, match=match) as ei:
            for i in range(3):
                sampler.obtain_samples(i)
        assert time.monotonic() - read_stamp(stamp) < BOUND_S
        assert sampling_children() == []
        _assert_closed(sampler)
    return ei.value


@pytest.mark.parametrize("kind", PARALLEL)
def test_worker_exception_that_cannot_be_pickled(kind, tmp_path, no_leaks):
    err = _step_fault(kind, tmp_path, locked_error, r"worker 1 \(envs 2\.\.3\) raised "
                                                    r"LockedError: boom in step of env 3 \(in "
                                                    r"env 3, step \d+ of the batch\); its")
    assert isinstance(err.__cause__.__cause__, RemoteTraceback)
    assert "_inject_fault" in err.remote_traceback
    assert "LockedError" in err.remote_traceback
    del err
    no_leaks.assert_clean()


@pytest.mark.parametrize("kind", PER_DRIVER)
def test_worker_exception_that_cannot_be_unpickled(kind, tmp_path, no_leaks):
    # It pickles in the worker but TwoArgError(*args) fails in the parent.
    err = _step_fault(kind, tmp_path, two_arg_error,
                      r"worker 1 \(envs 2\.\.3\) raised .*TwoArgError")
    assert "_inject_fault" in err.remote_traceback
    assert "TwoArgError" in err.remote_traceback
    del err
    no_leaks.assert_clean()


@pytest.mark.parametrize("kind", PARALLEL)
def test_worker_sys_exit(kind, tmp_path, no_leaks):
    err = _step_fault(kind, tmp_path, sys_exit,
                      r"worker 1 \(envs 2\.\.3\) raised SystemExit: sys.exit: boom")
    assert type(err.__cause__) is SystemExit
    del err
    no_leaks.assert_clean()


@pytest.mark.parametrize("kind", PARALLEL)
def test_bad_env_output_in_worker(kind, no_leaks):
    env_fn = functools.partial(ShapeChangingEnv, bad_env=1, at=2)
    with sampling.make_sampler(kind, env_fn, CountingAgent(), start_method="fork",
                               **SMALL) as sampler:
        with pytest.raises(WorkerError, match=r"worker 0 \(envs 0\.\.1\) raised ValueError: "
                                              r"env 1 .*observation.*shape \(5,\)") as ei:
            sampler.obtain_samples(0)
        assert type(ei.value.__cause__) is ValueError
        _assert_closed(sampler)
    del sampler, ei
    no_leaks.assert_clean()


@pytest.mark.parametrize("kind", PARALLEL)
def test_bad_agent_output(kind, no_leaks):
    with sampling.make_sampler(kind, CountingEnv, BadShapeAgent(from_call=3),
                               start_method="fork", **SMALL) as sampler:
        if kind in WORKER_AGENTS:  # each worker's copy fails: either may be reported
            with pytest.raises(WorkerError, match=r"worker [01] \(envs [02]\.\.[13]\) raised "
                                                  r"ValueError: .*agent.step returned shape "
                                                  r"\(3,\), expected \(2,\)") as ei:
                sampler.obtain_samples(0)
            assert type(ei.value.__cause__) is ValueError
        else:
            with pytest.raises(ValueError, match=r"action server.*agent.step returned shape "
                                                 r"\((5|3),\), expected \((4|2),\)"):
                sampler.obtain_samples(0)
        assert sampling_children() == []
        _assert_closed(sampler)
    del sampler
    no_leaks.assert_clean()


# -- the user's side: exceptions in the loop body, forgotten samplers -----------------------------
@pytest.mark.parametrize("kind", PARALLEL)
def test_exception_in_loop_body_shuts_down(kind, no_leaks):
    with pytest.raises(TrainingError):
        with sampling.make_sampler(kind, CountingEnv, CountingAgent(), start_method="fork",
                                   **SMALL) as sampler:
            for i, _ in enumerate(sampler.steps()):
                if i == 1:
                    raise TrainingError("in train()")
    assert sampling_children() == []
    _assert_closed(sampler)
    del sampler
    no_leaks.assert_clean()


@pytest.mark.parametrize("start_method", METHODS_AND_SMOKE)
def test_forgotten_sampler_is_cleaned_up_by_gc(start_method, no_leaks):
    sampler = sampling.make_sampler("gpu", CountingEnv, CountingAgent(),
                                    start_method=start_method, **SMALL)
    batch = sampler.obtain_samples(0)
    assert len(sampling_children()) == 2
    del sampler
    gc.collect()
    assert batch.reward.shape == (10, 4)  # the views outlive the sampler
    del batch
    no_leaks.assert_clean()


@pytest.mark.parametrize("kind", PER_DRIVER)
def test_eval_fault_message_names_the_eval_env(kind, no_leaks):
    # Not "(in env 1, ...)": env 1 is a training env of worker 0; the failing one is eval env 1.
    eval_env_fn = functools.partial(FaultEnv, after=2, fail_env=5, safe_pid=os.getpid())
    with sampling.make_sampler(kind, CountingEnv, CountingAgent(), start_method="fork",
                               eval_env_fn=eval_env_fn, eval_n_envs=2, eval_max_steps=40,
                               **SMALL) as sampler:
        sampler.obtain_samples(0)
        with pytest.raises(WorkerError) as ei:
            sampler.evaluate_agent(0)
    msg = str(ei.value)
    assert "worker 1" in msg and "eval" in msg
    assert re.search(r"\beval env (1|5)\b", msg), msg
    assert not re.search(r"\(in env 1\b", msg), msg
    del sampler, ei
    no_leaks.assert_clean()


# -- the agent in the parent ------------------------------------------------------------------
@pytest.mark.parametrize("kind,start_method", with_methods(PARALLEL))
def test_parent_agent_exception_propagates_unchanged(kind, start_method, no_leaks):
    # Served kinds: agent.step raises in the parent mid-batch (call 1 is the probe).
    # Worker agents (cpu): the parent only runs the agent's hooks; sample_mode raises on the
    # 2nd batch.
    hook = "sample_mode" if kind in WORKER_AGENTS else "step"
    agent = ParentFaultAgent(os.getpid(), fail_at=15, exc=AgentFault, hook=hook)
    with sampling.make_sampler(kind, CountingEnv, agent, start_method=start_method,
                               **SMALL) as sampler:
        with pytest.raises(AgentFault, match="parent agent boom") as ei:
            for i in range(3):
                sampler.obtain_samples(i)
        elapsed = time.monotonic() - agent.fault_time
        assert ei.type is AgentFault
        assert not isinstance(ei.value, WorkerError)
        assert elapsed < BOUND_S
        assert sampling_children() == []  # already shut down, not only at __exit__
        _assert_closed(sampler)
    del ei, sampler, agent
    no_leaks.assert_clean()


@pytest.mark.parametrize("kind", SERVED)
def test_parent_agent_exception_during_eval(kind, no_leaks):
    agent = ParentFaultAgent(os.getpid(), fail_at=10**9, exc=AgentFault)
    with sampling.make_sampler(kind, CountingEnv, agent, start_method="fork", eval_n_envs=2,
                               eval_max_steps=40, **SMALL) as sampler:
        sampler.obtain_samples(0)
        agent.fail_at = agent.calls + 3
        with pytest.raises(AgentFault, match="parent agent boom in step"):
            sampler.evaluate_agent(0)
        assert time.monotonic() - agent.fault_time < BOUND_S
        assert sampling_children() == []
        _assert_closed(sampler)
    del sampler, agent
    no_leaks.assert_clean()


# -- KeyboardInterrupt -------------------------------------------------------------------------
@pytest.mark.parametrize("kind,start_method", with_methods(SERVED))
def test_keyboard_interrupt_from_agent(kind, start_method, no_leaks):
    agent = ParentFaultAgent(os.getpid(), fail_at=3, exc=KeyboardInterrupt)
    with sampling.make_sampler(kind, CountingEnv, agent, start_method=start_method,
                               **SMALL) as sampler:
        with pytest.raises(KeyboardInterrupt):
            for _ in sampler.steps(3):
                pass
        assert time.monotonic() - agent.fault_time < BOUND_S
        assert sampling_children() == []
        _assert_closed(sampler)
    del sampler, agent
    no_leaks.assert_clean()


def _assert_ctrl_c_stops(sampler, call) -> None:
    """A Ctrl-C (SIGINT to the main thread) 0.3 s into ``call(sampler)`` raises
    KeyboardInterrupt within BOUND_S, with every worker gone and the sampler closed."""
    with pytest.raises(KeyboardInterrupt):
        with interrupt_after(0.3) as sent:
            call(sampler)
    raised_at = time.monotonic()
    assert sent and raised_at - sent[0] < BOUND_S
    assert sampling_children() == []
    _assert_closed(sampler)


def _three_batches(sampler) -> None:
    for _ in sampler.steps(3):
        pass


@pytest.mark.parametrize("kind,start_method", with_methods(PARALLEL))
def test_keyboard_interrupt_signal_during_slow_batch(kind, start_method, no_leaks):
    env_fn = functools.partial(SlowEnv, delay=0.2)  # a batch takes >= 2 s
    with sampling.make_sampler(kind, env_fn, CountingAgent(), start_method=start_method,
                               **SMALL) as sampler:
        _assert_ctrl_c_stops(sampler, _three_batches)
    del sampler
    no_leaks.assert_clean()


@pytest.mark.parametrize("kind", PARALLEL)
def test_keyboard_interrupt_signal_during_slow_evaluation(kind, no_leaks):
    eval_env_fn = functools.partial(SlowEnv, delay=0.2)  # an evaluation takes >= 2 s
    with sampling.make_sampler(kind, CountingEnv, CountingAgent(), start_method="fork",
                               eval_env_fn=eval_env_fn, eval_n_envs=2, eval_max_steps=40,
                               **SMALL) as sampler:
        sampler.obtain_samples(0)
        _assert_ctrl_c_stops(sampler, lambda s: s.evaluate_agent(0))
    del sampler
    no_leaks.assert_clean()


# -- a slow env is not a dead one --------------------------------------------------------------
@pytest.mark.parametrize("kind", PARALLEL)
def test_slow_env_is_not_dead(kind, no_leaks):
    # 0.3 s per step, about 1 s per batch and per evaluation: the parent and the workers
    # wake from their waits to check on each other (sampling.pool.POLL_S, and GATHER_POLL_S
    # for a whole batch) while the env is busy, and must not take it for dead
    env_fn = functools.partial(SlowEnv, delay=0.3)
    with sampling.make_sampler(kind, env_fn, CountingAgent(), batch_T=3, batch_B=2,
                               n_workers=2, eval_n_envs=2, eval_max_steps=6,
                               start_method="fork") as sampler:
        batch = sampler.obtain_samples(0)  # about 1 s
        assert batch.observation.shape == (3, 2, 4)
        np.testing.assert_array_equal(batch.observation[:, :, 0], [[0, 1]] * 3)
        np.testing.assert_array_equal(batch.reward, [[1, 1], [2, 2], [3, 3]])
        assert [t.Length for t in batch.traj_infos] == [3]  # env 0's first episode: 3 steps
        trajs = sampler.evaluate_agent(0)  # 3 steps per eval env
        assert len(trajs) == 1 and trajs[0].Length == 3
    del sampler, batch
    no_leaks.assert_clean()


# -- resource-tracker warnings: only visible when the interpreter exits ------------------------
TRACKER_SCRIPT = CTRL_C_RAISES + textwrap.dedent("""
    import functools, gc, os, signal, sys, time
    import multiprocessing as mp
    import sampling
    from sampling import WorkerError
    from tests.fault_helpers import ParentFaultAgent
    from tests.helpers import CountingAgent, CountingEnv, FaultEnv, SlowEnv

    method = sys.argv[1]
    pid = os.getpid()
    kw = dict(batch_T=10, batch_B=4, n_workers=2, start_method=method)

    def expect(exc, fn):
        try:
            fn()
        except exc:
            return
        sys.exit(f"expected {exc.__name__}")

    # normal shutdown, with evaluation (one kind per group count)
    for kind in ("cpu", "no_overlap_alternating"):
        with sampling.make_sampler(kind, CountingEnv, CountingAgent(), eval_n_envs=2,
                                   eval_max_steps=20, **kw) as s:
            s.obtain_samples(0)
            s.evaluate_agent(0)

    # worker exceptions: at construction and mid-batch
    def init_fault():
        sampling.make_sampler("gpu", functools.partial(FaultEnv, where="init"),
                              CountingAgent(), **kw)
    expect(WorkerError, init_fault)

    def step_fault():
        with sampling.make_sampler("cpu", functools.partial(FaultEnv, after=15, safe_pid=pid),
                                   CountingAgent(), **kw) as s:
            for i in range(3):
                s.obtain_samples(i)
    expect(WorkerError, step_fault)

    # a worker SIGKILLed between batches
    def killed():
        with sampling.make_sampler("alternating", CountingEnv, CountingAgent(), **kw) as s:
            s.obtain_samples(0)
            w = [p for p in mp.active_children() if p.name.endswith("worker-1")][0]
            os.kill(w.pid, signal.SIGKILL)
            s.obtain_samples(1)
    expect(WorkerError, killed)

    # KeyboardInterrupt from the parent's agent, and from a signal
    def ki_agent():
        agent = ParentFaultAgent(pid, fail_at=3, exc=KeyboardInterrupt)
        with sampling.make_sampler("no_overlap_alternating", CountingEnv, agent, **kw) as s:
            for _ in s.steps(3):
                pass
    expect(KeyboardInterrupt, ki_agent)

    def ki_signal():
        import threading
        t = threading.Timer(0.3, lambda: os.kill(pid, signal.SIGINT))
        with sampling.make_sampler("cpu", functools.partial(SlowEnv, delay=0.2),
                                   CountingAgent(), **kw) as s:
            t.start()
            try:
                for _ in s.steps(3):
                    pass
            finally:
                t.cancel()
    expect(KeyboardInterrupt, ki_signal)

    # a sampler the user forgets to shut down (the finalizer runs at exit)
    forgotten = sampling.make_sampler("cpu", CountingEnv, CountingAgent(), **kw)
    forgotten.obtain_samples(0)
    gc.collect()
    print("OK", flush=True)
""")


@pytest.mark.start_method_matters
@pytest.mark.parametrize("start_method", ALL_METHODS)
def test_no_resource_tracker_warnings(start_method):
    proc = subprocess.run([sys.executable, "-c", TRACKER_SCRIPT, start_method], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    assert "leaked" not in proc.stderr, proc.stderr
    assert "resource_tracker" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# -- the parent itself SIGKILLed, and a real Ctrl-C ---------------------------------------------
# The script records the /dev/shm names it creates (printed as they appear: the segment's
# name is unlinked as soon as the workers attach) and prints PIDS and READY when the test
# may strike: "construct" while the workers are still starting, "idle" between batches,
# "batch" mid-batch (in served kinds the parent hangs in the agent, the workers wait for
# actions; where the workers run the agent (cpu) they step a slow env).
CHILD_SCRIPT = CTRL_C_RAISES + RECORD_NAMES + textwrap.dedent("""
    import sampling
    from tests.fault_helpers import ReadyThenHangAgent, SlowInitEnv
    from tests.helpers import CountingEnv, SlowEnv

    kind, method, when = sys.argv[1], sys.argv[2], sys.argv[3]
    served = sampling.KINDS[kind].served

    def workers():
        return [p.pid for p in mp.active_children() if p.name.startswith("sampling-")]

    def ready():
        print("PIDS", *workers())
        print("READY", flush=True)

    def ready_when_started():
        while len(workers()) < 2:
            time.sleep(0.02)
        ready()

    env_fn, T = CountingEnv, 10
    if when == "construct":
        env_fn = functools.partial(SlowInitEnv, delay=1.0)
        threading.Thread(target=ready_when_started, daemon=True).start()
    elif when == "batch" and not served:  # a batch takes 20 s: 2 envs x 100 steps x 0.1 s
        env_fn, T = functools.partial(SlowEnv, delay=0.1), 100
    agent = ReadyThenHangAgent(os.getpid(), at=10**9)
    try:
        with sampling.make_sampler(kind, env_fn, agent, batch_T=T, batch_B=4, n_workers=2,
                                   start_method=method) as s:
            if when == "batch" and not served:
                timer = threading.Timer(0.5, ready)
                timer.daemon = True
                timer.start()
            for i, _ in enumerate(s.steps(100)):
                if i == 0 and when == "idle":
                    ready()
                    time.sleep(120)
                if i == 0 and when == "batch":
                    print("PIDS", *workers(), flush=True)
                    agent.at = agent.calls + 3  # READY, then hang, in the next batch
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
""")


def _start_child(kind, start_method, when, **popen_kw):
    return subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT, kind, start_method, when],
                            cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen_kw)


def _wait_gone(pids, names, bound) -> tuple:
    """Wait up to ``bound`` s for ``pids`` to die and ``names`` to leave /dev/shm; what is
    left of each."""
    def left() -> tuple:
        return [p for p in pids if alive(p)], set(names) & shm_entries()

    wait_until(lambda: left() == ([], set()), bound, period=0.1)
    return left()


def _cleanup_child(proc, pids) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    kill_all(pids)
    proc.stdout.close()
    proc.stderr.close()


def _in_turn(kinds, methods) -> list:
    """``(kind, start method)``: each of ``kinds`` with the next of ``methods`` (those here)
    in turn, so that a few subprocess tests cover every such kind and several methods."""
    here = [m for m in methods if m in ALL_METHODS]
    return [(k, here[i % len(here)]) for i, k in enumerate(kinds)]


# The kinds whose workers run the agent (cpu) idle, constructing and mid-batch (20 s of env
# steps: such a worker must look for its parent by itself), every served kind mid-batch.
PARENT_KILL_CASES = ([(k, m, "idle") for k in WORKER_AGENTS for m in ALL_METHODS]
                     + [(k, m, "construct") for k in WORKER_AGENTS for m in ALL_METHODS]
                     + [(k, m, "batch") for k, m in _in_turn(SERVED, ["fork", "forkserver",
                                                                       "spawn"])]
                     + [(k, m, "batch") for k in WORKER_AGENTS for m in ("fork", "spawn")
                        if m in ALL_METHODS])


@pytest.mark.start_method_matters
@pytest.mark.parametrize("kind,start_method,when", PARENT_KILL_CASES)
def test_parent_sigkill_leaves_nothing(kind, start_method, when):
    proc = _start_child(kind, start_method, when)
    family: list = []
    try:
        info = read_until_ready(proc, time.monotonic() + 30)
        workers = [int(p) for p in info["PIDS"]]
        created = set(info["SHM"])
        assert len(workers) == 2 and all(alive(p) for p in workers)
        assert any(n.startswith("psm") for n in created)
        family = descendants(proc.pid)  # workers, forkserver, resource tracker
        assert set(workers) <= set(family)
        if when == "construct":  # the segment's name is still there: the tracker must unlink it
            assert {n for n in created if n.startswith("psm")} <= shm_entries()
        proc.kill()
        proc.wait(10)
        # workers notice within their poll period (sampling.pool.POLL_S); a constructing one
        # after its 1 s env_fn
        running, left = _wait_gone(family, created, BOUND_S)
        assert not running, f"processes outlived their SIGKILLed parent: {running}"
        assert not left, f"left in /dev/shm after the parent was SIGKILLed: {sorted(left)}"
    finally:
        _cleanup_child(proc, family)


@pytest.mark.start_method_matters
@pytest.mark.parametrize("kind,start_method,when",
                         [(k, m, "batch") for k in WORKER_AGENTS for m in ALL_METHODS]
                         + [(k, m, "batch") for k, m in _in_turn(SERVED, ["spawn", "fork",
                                                                          "forkserver"])]
                         + [(k, m, "construct") for k in WORKER_AGENTS for m in ALL_METHODS])
def test_ctrl_c_to_the_process_group(kind, start_method, when):
    # What a terminal does on Ctrl-C: SIGINT to every process of the foreground group.
    proc = _start_child(kind, start_method, when, start_new_session=True)
    family: list = []
    try:
        info = read_until_ready(proc, time.monotonic() + 30)
        created = set(info["SHM"])
        family = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=BOUND_S + 10)
        assert time.monotonic() - sent < BOUND_S + 5  # shutdown included
        out, err = out.decode(), err.decode()
        assert proc.returncode == 0 and "INTERRUPTED" in out, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert "leaked" not in err, err
        running, left = _wait_gone(family, created, 1.0)
        assert not running and not left, (running, left)
    finally:
        _cleanup_child(proc, family)


SIGINT_BOOT_SCRIPT = CTRL_C_RAISES + textwrap.dedent("""
    import os, signal, sys, threading, time
    if __name__ == "__mp_main__":
        time.sleep(1.0)  # a slow top-level import (torch, say), re-run in every spawn worker
    if __name__ == "__main__":
        import multiprocessing as mp
        import sampling
        from tests.helpers import CountingAgent, CountingEnv

        def interrupt_workers():  # while they are still importing the main module
            ws = []
            while len(ws) < 2:
                time.sleep(0.02)
                ws = [p for p in mp.active_children() if p.name.startswith("sampling-")]
            time.sleep(0.3)
            for p in ws:
                os.kill(p.pid, signal.SIGINT)

        threading.Thread(target=interrupt_workers, daemon=True).start()
        with sampling.make_sampler("cpu", CountingEnv, CountingAgent(), batch_T=10, batch_B=4,
                                   n_workers=2, start_method="spawn") as s:
            s.obtain_samples(0)
        print("OK")
""")


@pytest.mark.start_method_matters
def test_sigint_to_a_starting_spawn_worker_is_ignored(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SIGINT_BOOT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


# -- a worker that dies while its process is starting ------------------------------------------
STARTUP = (r"while its process was starting \('{method}' start method\), before running any "
           r"sampling code")
STARTUP_CAUSES = (r"the cause is printed on the worker's stderr above\. Usually the child could "
                  r"not import the main module: a script without an `if __name__ == "
                  r"\"__main__\":` guard .*a script run from stdin .*a notebook cell.*Fix: put "
                  r"the script's top-level code under `if __name__ == \"__main__\":`, define "
                  r"env_fn and the agent in an importable module")


@pytest.mark.start_method_matters
@pytest.mark.parametrize("start_method", ALL_METHODS)
@pytest.mark.parametrize("case", ["exit_before", "killed_before", "exit_after_started"])
def test_worker_dying_before_it_started(case, start_method, monkeypatch, no_leaks):
    # The worker's target is swapped for a stand-in that dies before worker_main would run
    # (or just after its "started" message): only the first is a start-up failure.
    from tests import fault_helpers

    target, code = {"exit_before": (fault_helpers.exit_before_worker_main, 1),
                    "killed_before": (fault_helpers.killed_before_worker_main, -9),
                    "exit_after_started": (fault_helpers.exit_after_started, 3)}[case]
    monkeypatch.setattr("sampling.pool.worker_entry", target)
    with pytest.raises(WorkerError) as ei:
        sampling.make_sampler("cpu", CountingEnv, CountingAgent(), start_method=start_method,
                              **SMALL)
    err, msg = ei.value, str(ei.value)
    assert err.exitcode == code and err.remote_traceback is None and err.__cause__ is None
    head = r"^cpu sampler: worker [01] \(envs [02]\.\.[13]\) "
    startup = STARTUP.format(method=start_method)
    if case == "exit_before":
        assert re.search(rf"{head}exited with code 1 {startup}; {STARTUP_CAUSES}", msg), msg
        assert ("start_method='fork'" in msg) == (start_method != "fork"), msg
        assert "out-of-memory" not in msg, msg
    elif case == "killed_before":
        assert re.search(rf"{head}was killed by signal SIGKILL {startup}; if nothing killed "
                         r"it, check the system log for the out-of-memory killer$", msg), msg
    else:  # it had started: the message for a worker that dies later
        assert re.search(rf"{head}exited with code 3 without reporting an error; if nothing "
                         r"killed it, check the system log for the out-of-memory killer", msg), msg
        assert "while its process was starting" not in msg, msg
    del err, ei
    no_leaks.assert_clean()


# The classic start-up failures, for real: a script without the main guard (spawn and
# forkserver workers re-run it and multiprocessing stops them in its bootstrapping phase;
# fork workers never re-run it, so it works there), and a script fed through stdin (the
# workers look for a file named "<stdin>").
NO_GUARD_SCRIPT = textwrap.dedent("""
    import sys

    import sampling
    from tests.helpers import CountingAgent, CountingEnv

    with sampling.make_sampler("cpu", CountingEnv, CountingAgent(), batch_T=4, batch_B=4,
                               n_workers=2, start_method=sys.argv[1]) as s:
        s.obtain_samples(0)
    print("OK", flush=True)
""")
# After the script exits, its resource tracker and forkserver notice their closed pipes and
# exit too; its workers are gone already (the script kills them before it raises).
LEFTOVER_WAIT_S = 5.0


def _tagged_pids(tag: str) -> list:
    """Live processes whose environment holds ``tag`` (the script and all it started, even
    those reparented after it exited)."""
    want, out = tag.encode(), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    out.append(int(d))
        except OSError:
            continue
    return [p for p in out if alive(p)]


@pytest.mark.start_method_matters
@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="needs /proc")
@pytest.mark.parametrize("how,start_method", [("file", m) for m in ALL_METHODS]
                         + [("stdin", m) for m in ALL_METHODS if m != "fork"])
def test_startup_failure_in_a_real_script(how, start_method, tmp_path):
    tag_value = f"{os.getpid()}-{how}-{start_method}-{time.monotonic_ns()}"
    tag = f"SAMPLING_STARTUP_TEST={tag_value}"  # as it appears in /proc/<pid>/environ
    env = dict(script_env(), SAMPLING_STARTUP_TEST=tag_value)
    if how == "file":
        script = tmp_path / "train.py"
        script.write_text(NO_GUARD_SCRIPT)
        kw = dict(args=[sys.executable, str(script), start_method])
    else:
        kw = dict(args=[sys.executable, "-", start_method], input=NO_GUARD_SCRIPT)
    try:
        proc = subprocess.run(**kw, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_S)
        wait_until(lambda: not _tagged_pids(tag), LEFTOVER_WAIT_S, period=0.1)
        assert not _tagged_pids(tag), "processes outlived the script"
    finally:
        kill_all(_tagged_pids(tag))
    err = proc.stderr
    if start_method == "fork":  # nothing re-runs the script: it works
        assert proc.returncode == 0 and "OK" in proc.stdout, err
        return
    assert proc.returncode == 1 and "OK" not in proc.stdout, err
    m = re.search(r"sampling\.errors\.WorkerError: cpu sampler: worker [01] \(envs \d\.\.\d\) "
                  rf"exited with code 1 {STARTUP.format(method=start_method)}; "
                  rf"{STARTUP_CAUSES}.*\n", err)
    assert m, err
    assert "out-of-memory" not in m.group(0), err
    # The cause, printed by the worker, comes before the parent's error.
    cause = ("bootstrapping phase" if how == "file"
             else "FileNotFoundError: [Errno 2] No such file or directory")
    assert cause in err[:m.start()], err
    if how == "stdin":
        assert "<stdin>" in err[:m.start()], err
