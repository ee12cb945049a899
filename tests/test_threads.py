"""A sampler serves one thread at a time: a second thread gets a clear error instead of a
deadlock or interleaved batches, and shutdown() from another thread stops a batch in
flight with SamplerClosedError, promptly, leaving nothing behind."""
from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

import pytest

import sampling
from sampling.pool import GATHER_POLL_S, POLL_S
from tests.fault_helpers import wait_until
from tests.helpers import (
    KINDS,
    CountingAgent,
    StepLogEnv,
    assert_batches_equal,
    open_gate,
    read_step_log,
    snapshot,
    with_methods,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

T = 8
STEP_S = 0.02  # the env's sleep per step: a batch of T=8 takes ~0.16 s
# How long a test waits for the collecting thread to be inside a step (it logs it): a bound
# for a loaded machine, not a nominal time.
IN_FLIGHT_BOUND_S = 30.0
# The collecting thread must notice within the sampler's poll periods (GATHER_POLL_S for a
# whole batch, POLL_S in the per-step handoff), with 2 s to spare for a loaded machine.
LOADED_SLACK_S = 2.0
CLOSE_BOUND_S = max(GATHER_POLL_S, POLL_S) + LOADED_SLACK_S


def _steps_entered(log_dir) -> int:
    """How many env steps were entered so far: began, or wait at their gate (StepLogEnv's
    "begin" and "wait" lines, the probe env's too)."""
    return sum(f.read_text().count("begin ") + f.read_text().count("wait ")
               for f in Path(log_dir).glob("log-*"))


def _inside_a_step(log_dir, before: int) -> None:
    """Wait until a step was entered after ``before`` of them had: someone is collecting."""
    assert wait_until(lambda: _steps_entered(log_dir) > before, IN_FLIGHT_BOUND_S,
                      period=0.01)


def _make(kind, log_dir, start_method="fork", **kw):
    env = functools.partial(StepLogEnv, str(log_dir), delay=STEP_S, gate_every=T,
                            lengths=(100,))
    open_gate(log_dir, 0)
    return sampling.make_sampler(kind, env, CountingAgent(), batch_T=T, batch_B=2,
                                 n_workers=2, start_method=start_method, **kw)


class Collect(threading.Thread):
    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: B036 - handed to the test
            self.error = e
        self.ended = time.monotonic()


def _shut_down_while_collecting(s, collect, log_dir):
    """Run ``collect`` in a thread named "collecting", call ``s.shutdown()`` from this one
    once that thread's batch is inside a step; return that thread (ended) and when
    shutdown() was called."""
    before = _steps_entered(log_dir)
    worker = Collect(collect)
    worker.name = "collecting"
    worker.start()
    _inside_a_step(log_dir, before)
    t0 = time.monotonic()
    s.shutdown()
    worker.join(CLOSE_BOUND_S + LOADED_SLACK_S)
    assert not worker.is_alive(), "the collecting thread hung after shutdown()"
    return worker, t0


@pytest.mark.parametrize("call", ["obtain_samples", "evaluate_agent"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_second_thread_gets_a_clear_error_and_the_first_batch_is_intact(kind, call,
                                                                          tmp_path):
    """The first thread's batch 1 waits at its gate (inside its first step) until the
    second thread has been refused."""
    ref, log = tmp_path / "ref", tmp_path / "log"
    ref.mkdir()
    log.mkdir()
    for k in range(3):
        open_gate(ref, k)
    with _make(kind, ref, eval_n_envs=2, eval_max_steps=8) as s:
        want = [snapshot(b) for b in s.steps(3)]  # the reference: no second thread
    with _make(kind, log, eval_n_envs=2, eval_max_steps=8) as s:
        s.obtain_samples(0)
        first = Collect(lambda: snapshot(s.obtain_samples(1)))
        first.start()
        assert wait_until(lambda: any(k[1:] == (T + 1, "wait") for k in read_step_log(log)),
                          IN_FLIGHT_BOUND_S)  # batch 1's first step waits at its gate
        with pytest.raises(sampling.SamplerError, match=f"{call}: the {kind} sampler is "
                                                         f"already collecting in another thread"):
            getattr(s, call)()
        open_gate(log, 1)
        open_gate(log, 2)
        first.join(IN_FLIGHT_BOUND_S)
        assert first.error is None, first.error
        assert_batches_equal(first.result, want[1])  # nothing interleaved
        assert_batches_equal(snapshot(s.obtain_samples(2)), want[2])  # and still usable


@pytest.mark.parametrize("kind,start_method", with_methods(KINDS))
def test_shutdown_from_another_thread_stops_a_batch_in_flight(kind, start_method, tmp_path):
    s = _make(kind, tmp_path, start_method)
    s.obtain_samples()
    if not sampling.KINDS[kind].workers:  # the parent steps: the collecting thread must
        open_gate(tmp_path, 1)  # finish its step (it stops at its next check)
    # else batch 1 waits at its gate, in the workers: it cannot finish before shutdown()
    worker, t0 = _shut_down_while_collecting(s, lambda: s.obtain_samples(), tmp_path)
    assert worker.ended - t0 < CLOSE_BOUND_S
    if not sampling.KINDS[kind].workers:  # the parent steps: the batch may finish first
        assert worker.error is None or isinstance(worker.error, sampling.SamplerClosedError)
    else:
        assert isinstance(worker.error, sampling.SamplerClosedError), repr(worker.error)
    with pytest.raises(sampling.SamplerClosedError):
        s.obtain_samples()
    s.shutdown()  # idempotent


class ClosingEnv(StepLogEnv):
    """Records a step that comes after its close(): closing an env while another thread
    steps it is what a real simulator may crash on."""

    def __init__(self, log, log_dir, **kw):
        super().__init__(log_dir, **kw)
        self.log, self.closed = log, False

    def step(self, action):
        if self.closed:
            self.log.append("step after close")
        return super().step(action)

    def close(self):
        self.closed = True
        self.log.append(f"closed in {threading.current_thread().name}")


@pytest.mark.parametrize("call", ["obtain_samples", "evaluate_agent"])
@pytest.mark.parametrize("kind", [k for k, v in sampling.KINDS.items() if not v.workers])
def test_shutdown_from_another_thread_stops_an_in_process_batch(kind, call, tmp_path):
    # The parent steps the envs itself: shutdown() must not close them under the collecting
    # thread; that thread stops within POLL_S (after the step in progress), closes them, and
    # raises.
    log = []
    s = sampling.make_sampler(kind, lambda: ClosingEnv(log, str(tmp_path), delay=STEP_S,
                                                       lengths=(100,)),
                              CountingAgent(), batch_T=60, batch_B=2, eval_n_envs=2,
                              eval_max_steps=120)  # ~6 s of steps either way
    worker, t0 = _shut_down_while_collecting(s, getattr(s, call), tmp_path)
    assert worker.ended - t0 < POLL_S + STEP_S + LOADED_SLACK_S
    assert isinstance(worker.error, sampling.SamplerClosedError), repr(worker.error)
    assert "step after close" not in log
    # every env built (eval envs are built by the first evaluation), by the stepping thread
    assert log.count("closed in collecting") == (4 if call == "evaluate_agent" else 2)
    with pytest.raises(sampling.SamplerClosedError):
        s.obtain_samples()
    s.shutdown()  # idempotent
