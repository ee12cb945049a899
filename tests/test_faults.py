"""Never hang, never leak: faults, interrupts and bad input, for every parallel kind and
start method.

Each case checks the error (type, message, cause chain), the time from the fault to the
parent's raise, that the sampler is closed afterwards, and that nothing is left behind:
no /dev/shm entry (segments and named semaphores) created by the sampler, no worker
process alive. Resource-tracker warnings are checked in subprocesses (they are printed
when the interpreter exits), and so is a SIGKILL of the parent itself.
"""
from __future__ import annotations

import functools
import gc
import multiprocessing as mp
import multiprocessing.process
import multiprocessing.shared_memory
import multiprocessing.synchronize
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import sampling
from sampling import RemoteTraceback, SamplerClosedError, WorkerError
from tests.fault_helpers import (
    AgentFault,
    EnvFault,
    FaultEnv,
    ParentFaultAgent,
    WorkerFaultAgent,
    read_stamp,
)
from tests.helpers import CountingAgent, CountingEnv, SlowEnv, shm_entries

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["cpu", "gpu", "alternating", "no_overlap_alternating"]
SERVED = ["gpu", "alternating", "no_overlap_alternating"]
METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
BOUND_S = 5.0  # a fault must reach the parent within this many seconds
SMALL = dict(batch_T=10, batch_B=4, n_workers=2)


# -- leak and orphan bookkeeping ------------------------------------------------------------
def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pid reused by someone else's process
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _sampling_children() -> list:
    return [p for p in mp.active_children() if p.name.startswith("sampling-")]


class Watch:
    """Records what samplers create in this process: /dev/shm names (shared-memory
    segments and named semaphores) and worker pids."""

    def __init__(self):
        self.before = shm_entries()
        self.created: set = set()
        self.pids: dict = {}

    def worker_pid(self, kind: str, w: int) -> int:
        name = f"sampling-{kind}-worker-{w}"
        (p,) = [p for p in mp.active_children() if p.name == name]
        return p.pid

    def assert_clean(self) -> None:
        """Nothing the sampler created is left: call after dropping the sampler and the
        exception (named semaphores go when garbage-collected)."""
        gc.collect()
        assert self.created, "the watch saw no shared-memory segment being created"
        assert self.pids, "the watch saw no worker process being started"
        leaked = (shm_entries() - self.before) & self.created
        assert not leaked, f"left in /dev/shm: {sorted(leaked)}"
        children = _sampling_children()
        assert not children, f"worker processes still running: {children}"
        alive = {name: pid for name, pid in self.pids.items() if _alive(pid)}
        assert not alive, f"worker processes alive: {alive}"


@pytest.fixture
def watch(monkeypatch):
    w = Watch()
    sem_init = mp.synchronize.SemLock.__init__
    shm_init = mp.shared_memory.SharedMemory.__init__
    start = mp.process.BaseProcess.start

    def sem_init_rec(self, *args, **kwargs):
        sem_init(self, *args, **kwargs)
        name = self._semlock.name  # None where the name is unlinked at once (fork)
        if name:
            w.created.add("sem." + name.lstrip("/"))

    def shm_init_rec(self, name=None, create=False, size=0, *args, **kwargs):
        shm_init(self, name, create, size, *args, **kwargs)
        if create:
            w.created.add(self.name.lstrip("/"))

    def start_rec(self):
        start(self)
        if self.name.startswith("sampling-"):
            w.pids[f"{self.name}#{len(w.pids)}"] = self.pid

    monkeypatch.setattr(mp.synchronize.SemLock, "__init__", sem_init_rec)
    monkeypatch.setattr(mp.shared_memory.SharedMemory, "__init__", shm_init_rec)
    monkeypatch.setattr(mp.process.BaseProcess, "start", start_rec)
    yield w
    for pid in w.pids.values():  # never leave an orphan behind, even when a test failed
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


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
    "eval": ("eval", dict(where="step", after=2, fail_env=5), "step 0 of the batch"),
    "worker_agent": ("batch", None, None),
    "exit_step": ("batch", dict(where="step", after=15, how="exit"), None),
    "kill_step": ("batch", dict(where="step", after=15, how="kill"), None),
    "kill_between": ("between", None, None),
    "kill_eval": ("eval", dict(where="step", after=2, fail_env=5, how="kill"), None),
}
RAISES = ("init", "reset", "decorrelation", "step", "eval", "worker_agent")
EXITCODE = {"exit_step": 3, "kill_step": -9, "kill_between": -9, "kill_eval": -9}


def _run_fault(kind, method, fault, tmp_path, watch) -> dict:
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
                    victim = watch.worker_pid(kind, 1)
                    with open(stamp, "w") as f:
                        f.write(repr(time.monotonic()))
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


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_fault_matrix(kind, start_method, fault, tmp_path, watch):
    if fault == "worker_agent" and kind != "cpu":
        pytest.skip("the agent runs in the parent in this kind (see test_parent_agent_*)")
    phase, _, where = FAULTS[fault]
    r = _run_fault(kind, start_method, fault, tmp_path, watch)

    assert r["type"] is WorkerError
    head = f"{kind} sampler: worker 1 (envs 2..3)"
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
    watch.assert_clean()


# -- the agent in the parent ------------------------------------------------------------------
@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_parent_agent_exception_propagates_unchanged(kind, start_method, watch):
    # Served kinds: agent.step raises in the parent mid-batch (call 1 is the probe).
    # cpu: the parent only runs the agent's hooks; sample_mode raises on the 2nd batch.
    hook = "sample_mode" if kind == "cpu" else "step"
    agent = ParentFaultAgent(os.getpid(), fail_at=15, exc=AgentFault, hook=hook)
    with sampling.make_sampler(kind, CountingEnv, agent, start_method=start_method,
                               **SMALL) as sampler:
        with pytest.raises(AgentFault, match="parent agent boom") as ei:
            for _ in range(3):
                sampler.obtain_samples(_)
        elapsed = time.monotonic() - agent.fault_time
        assert ei.type is AgentFault
        assert not isinstance(ei.value, WorkerError)
        assert elapsed < BOUND_S
        assert _sampling_children() == []  # already shut down, not only at __exit__
        _assert_closed(sampler)
    del ei, sampler, agent
    watch.assert_clean()


@pytest.mark.parametrize("kind", SERVED)
def test_parent_agent_exception_during_eval(kind, watch):
    agent = ParentFaultAgent(os.getpid(), fail_at=10**9, exc=AgentFault)
    with sampling.make_sampler(kind, CountingEnv, agent, start_method="fork", eval_n_envs=2,
                               eval_max_steps=40, **SMALL) as sampler:
        sampler.obtain_samples(0)
        agent.fail_at = agent.calls + 3
        with pytest.raises(AgentFault, match="parent agent boom in step"):
            sampler.evaluate_agent(0)
        assert time.monotonic() - agent.fault_time < BOUND_S
        assert _sampling_children() == []
        _assert_closed(sampler)
    del sampler, agent
    watch.assert_clean()


# -- KeyboardInterrupt -------------------------------------------------------------------------
@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", SERVED)
def test_keyboard_interrupt_from_agent(kind, start_method, watch):
    agent = ParentFaultAgent(os.getpid(), fail_at=3, exc=KeyboardInterrupt)
    with sampling.make_sampler(kind, CountingEnv, agent, start_method=start_method,
                               **SMALL) as sampler:
        with pytest.raises(KeyboardInterrupt):
            for _ in sampler.steps(3):
                pass
        assert time.monotonic() - agent.fault_time < BOUND_S
        assert _sampling_children() == []
        _assert_closed(sampler)
    del sampler, agent
    watch.assert_clean()


def _interrupt_main():
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_keyboard_interrupt_signal_during_slow_batch(kind, start_method, watch):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    env_fn = functools.partial(SlowEnv, delay=0.2)  # a batch takes >= 2 s
    sent = []
    timer = threading.Timer(0.3, lambda: (sent.append(time.monotonic()), _interrupt_main()))
    with sampling.make_sampler(kind, env_fn, CountingAgent(), start_method=start_method,
                               **SMALL) as sampler:
        try:
            with pytest.raises(KeyboardInterrupt):
                timer.start()
                for _ in sampler.steps(3):
                    pass
            raised_at = time.monotonic()
        finally:
            timer.cancel()
            timer.join()
        assert sent and raised_at - sent[0] < BOUND_S
        assert _sampling_children() == []
        _assert_closed(sampler)
    del sampler
    watch.assert_clean()


# -- a slow env is not a dead one --------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_slow_env_is_not_dead(kind, watch):
    # 0.3 s per step, longer than the parent's 0.1 s poll and the workers' 0.5 s poll / 2
    env_fn = functools.partial(SlowEnv, delay=0.3)
    with sampling.make_sampler(kind, env_fn, CountingAgent(), batch_T=2, batch_B=2,
                               n_workers=2, eval_n_envs=2, eval_max_steps=4,
                               start_method="fork") as sampler:
        for itr in range(2):
            batch = sampler.obtain_samples(itr)
            assert batch.observation.shape == (2, 2, 4)
            np.testing.assert_array_equal(batch.observation[:, :, 0], [[0, 1], [0, 1]])
            assert (batch.reward > 0).all()
        trajs = sampler.evaluate_agent(0)
        assert isinstance(trajs, list)
    del sampler, batch
    watch.assert_clean()


# -- resource-tracker warnings: only visible when the interpreter exits ------------------------
TRACKER_SCRIPT = textwrap.dedent("""
    import functools, gc, os, signal, sys, time
    import multiprocessing as mp
    import sampling
    from sampling import WorkerError
    from tests.fault_helpers import FaultEnv, ParentFaultAgent
    from tests.helpers import CountingAgent, CountingEnv, SlowEnv

    method = sys.argv[1]
    pid = os.getpid()
    kw = dict(batch_T=10, batch_B=4, n_workers=2, start_method=method)

    def expect(exc, fn):
        try:
            fn()
        except exc:
            return
        sys.exit(f"expected {exc.__name__}")

    # normal shutdown, every kind, with evaluation
    for kind in ("cpu", "gpu", "alternating", "no_overlap_alternating"):
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


@pytest.mark.parametrize("start_method", METHODS)
def test_no_resource_tracker_warnings(start_method):
    proc = subprocess.run([sys.executable, "-c", TRACKER_SCRIPT, start_method], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    assert "leaked" not in proc.stderr, proc.stderr
    assert "resource_tracker" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# -- the parent itself SIGKILLed -----------------------------------------------------------------
PARENT_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import multiprocessing as mp
    import multiprocessing.shared_memory, multiprocessing.synchronize
    created = []
    sem_init = mp.synchronize.SemLock.__init__
    shm_init = mp.shared_memory.SharedMemory.__init__
    def sem_init_rec(self, *a, **k):
        sem_init(self, *a, **k)
        if self._semlock.name:
            created.append("sem." + self._semlock.name.lstrip("/"))
    def shm_init_rec(self, name=None, create=False, size=0, *a, **k):
        shm_init(self, name, create, size, *a, **k)
        if create:
            created.append(self.name.lstrip("/"))
    mp.synchronize.SemLock.__init__ = sem_init_rec
    mp.shared_memory.SharedMemory.__init__ = shm_init_rec

    import sampling
    from tests.fault_helpers import ReadyThenHangAgent
    from tests.helpers import CountingEnv

    kind, method = sys.argv[1], sys.argv[2]
    agent = ReadyThenHangAgent(os.getpid(), at=10**9)
    s = sampling.make_sampler(kind, CountingEnv, agent, batch_T=10, batch_B=4, n_workers=2,
                              start_method=method)
    s.obtain_samples(0)
    pids = [p.pid for p in mp.active_children() if p.name.startswith("sampling-")]
    print("PIDS", *pids)
    print("SHM", *created, flush=True)
    if kind == "cpu":  # killed between batches, workers idle
        print("READY", flush=True)
        time.sleep(120)
    agent.at = agent.calls + 3  # killed mid-batch, workers waiting for actions
    s.obtain_samples(1)
""")


def _read_until_ready(proc, deadline) -> dict:
    lines: dict = {}
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode().splitlines():
                key, _, rest = line.partition(" ")
                lines[key] = rest.split()
            if "READY" in lines:
                return lines
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise AssertionError(f"the script did not get ready: {buf!r} {proc.stderr.read()!r}")


@pytest.mark.parametrize("kind,start_method", [("cpu", m) for m in METHODS]
                         + [("gpu", "fork"), ("alternating", "spawn")])
def test_parent_sigkill_leaves_nothing(kind, start_method):
    proc = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, kind, start_method],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids: list = []
    try:
        info = _read_until_ready(proc, time.monotonic() + 30)
        pids = [int(p) for p in info["PIDS"]]
        created = set(info["SHM"])
        assert len(pids) == 2 and created
        assert all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(10)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < BOUND_S:
            alive = [p for p in pids if _alive(p)]
            left = created & shm_entries()
            if not alive and not left:
                break
            time.sleep(0.1)
        assert not alive, f"workers outlived their SIGKILLed parent: {alive}"
        assert not left, f"left in /dev/shm after the parent was SIGKILLed: {sorted(left)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()
