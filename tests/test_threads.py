"""A sampler serves one thread at a time: a second thread gets a clear error instead of a
deadlock or interleaved batches, and shutdown() from another thread stops a batch in
flight with SamplerClosedError, promptly, leaving nothing behind."""
from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

import sampling
from sampling.pool import GATHER_POLL_S, POLL_S
from tests.helpers import KINDS, CountingAgent, SlowEnv, assert_batches_equal, snapshot

pytestmark = pytest.mark.usefixtures("no_leaks")

METHODS = [m for m in ("fork", "spawn") if m in mp.get_all_start_methods()]
STEP_S = 0.05  # SlowEnv's sleep per step: a batch of T=8 takes ~0.4 s
IN_FLIGHT_S = 0.15  # by then the first thread is inside its batch
# The collecting thread must notice within the sampler's poll periods (GATHER_POLL_S for a
# whole batch, POLL_S in the per-step handoff), with 2 s to spare for a loaded machine.
CLOSE_BOUND_S = max(GATHER_POLL_S, POLL_S) + 2.0


def _slow(**kw):
    return SlowEnv(delay=STEP_S, lengths=(100,), **kw)


def _make(kind, start_method="fork", **kw):
    return sampling.make_sampler(kind, _slow, CountingAgent(), batch_T=8, batch_B=2,
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


def _shut_down_while_collecting(s, collect):
    """Run ``collect`` in a thread named "collecting", call ``s.shutdown()`` from this one
    while it runs; return that thread (ended) and when shutdown() was called."""
    worker = Collect(collect)
    worker.name = "collecting"
    worker.start()
    time.sleep(IN_FLIGHT_S)
    t0 = time.monotonic()
    s.shutdown()
    worker.join(CLOSE_BOUND_S + 2)
    assert not worker.is_alive(), "the collecting thread hung after shutdown()"
    return worker, t0


@pytest.mark.parametrize("call", ["obtain_samples", "evaluate_agent"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_second_thread_gets_a_clear_error_and_the_first_batch_is_intact(kind, call):
    with _make(kind, eval_n_envs=2, eval_max_steps=8) as s:
        want = [snapshot(b) for b in s.steps(3)]  # the reference: no second thread
    with _make(kind, eval_n_envs=2, eval_max_steps=8) as s:
        s.obtain_samples(0)
        first = Collect(lambda: snapshot(s.obtain_samples(1)))
        first.start()
        time.sleep(IN_FLIGHT_S)
        with pytest.raises(sampling.SamplerError, match=f"{call}: the {kind} sampler is "
                                                         f"already collecting in another thread"):
            getattr(s, call)()
        first.join(10)
        assert first.error is None, first.error
        assert_batches_equal(first.result, want[1])  # nothing interleaved
        assert_batches_equal(snapshot(s.obtain_samples(2)), want[2])  # and still usable


@pytest.mark.parametrize("start_method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_from_another_thread_stops_a_batch_in_flight(kind, start_method):
    s = _make(kind, start_method)
    s.obtain_samples()
    worker, t0 = _shut_down_while_collecting(s, lambda: s.obtain_samples())
    assert worker.ended - t0 < CLOSE_BOUND_S
    if not sampling.KINDS[kind].workers:  # the parent steps: the batch may finish first
        assert worker.error is None or isinstance(worker.error, sampling.SamplerClosedError)
    else:
        assert isinstance(worker.error, sampling.SamplerClosedError), repr(worker.error)
    with pytest.raises(sampling.SamplerClosedError):
        s.obtain_samples()
    s.shutdown()  # idempotent


class ClosingEnv(SlowEnv):
    """Records a step that comes after its close(): closing an env while another thread
    steps it is what a real simulator may crash on."""

    def __init__(self, log, **kw):
        super().__init__(**kw)
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
def test_shutdown_from_another_thread_stops_an_in_process_batch(kind, call):
    # The parent steps the envs itself: shutdown() must not close them under the collecting
    # thread; that thread stops within POLL_S, closes them, and raises.
    log = []
    s = sampling.make_sampler(kind, lambda: ClosingEnv(log, delay=STEP_S, lengths=(100,)),
                              CountingAgent(), batch_T=60, batch_B=2, eval_n_envs=2,
                              eval_max_steps=120)  # ~6 s of steps either way
    worker, t0 = _shut_down_while_collecting(s, getattr(s, call))
    assert worker.ended - t0 < POLL_S + 2 * STEP_S + 1.0
    assert isinstance(worker.error, sampling.SamplerClosedError), repr(worker.error)
    assert "step after close" not in log
    # every env built (eval envs are built by the first evaluation), by the stepping thread
    assert log.count("closed in collecting") == (4 if call == "evaluate_agent" else 2)
    with pytest.raises(sampling.SamplerClosedError):
        s.obtain_samples()
    s.shutdown()  # idempotent
