"""Batch semantics of the serial sampler: alignment across resets in both reset modes,
final observations, episode stats, seeding, decorrelation, evaluation, bootstrap values,
dict observations, and the same invariants on gymnasium's CartPole-v1.

The hand-worked cases use CountingEnv(lengths=(2, 3)) with CountingAgent, batch_T=4,
batch_B=2: env b's episode k lasts lengths[(b + k) % 2] steps (2: terminated,
3: truncated); obs = [env_id, episode, t, last action]; reward = t after the step;
action = (env_id + t + prev_action) % 3.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest

import sampling
from tests.helpers import (
    RESET_MODES,
    CountingAgent,
    CountingEnv,
    DictObsEnv,
    IdTraj,
    PolicyAgent,
    assert_batches_equal,
    cartpole_policy,
    counting_policy,
    gym_cartpole,
    snapshot,
)

F, T_ = False, True


# -- helpers ---------------------------------------------------------------------------
def collect(kind="serial", env_fn=CountingEnv, agent=None, n=2, itr0=0, **kw) -> list:
    agent = CountingAgent() if agent is None else agent
    with sampling.make_sampler(kind, env_fn, agent, **kw) as s:
        return [snapshot(s.obtain_samples(itr0 + i)) for i in range(n)]


def envcols(*per_env) -> np.ndarray:
    """Stack per-env time series ([T, ...] each) into a [T, B, ...] array."""
    return np.stack([np.asarray(x) for x in per_env], axis=1)


def episode_lengths(env_id: int, lengths: tuple, n: int) -> list:
    """CountingEnv's schedule: lengths of the first n episodes of env ``env_id``."""
    return [lengths[(env_id + k) % len(lengths)] for k in range(n)]


LEN23 = functools.partial(CountingEnv, lengths=(2, 3))
SMALL = dict(batch_T=4, batch_B=2)


def check_counting_invariants(batches: list, lengths: tuple, wait: bool, seed: int = 0,
                              agent_rule: bool = True, first_batch_fresh: bool = True) -> None:
    """Every alignment rule of the batch table, step by step, for CountingEnv batches
    (consecutive batches from the start of sampling)."""
    B = batches[0]["done"].shape[1]
    for b in range(B):
        last = None  # (action, reward, terminated, truncated) of the previous step, None at start
        waiting = False
        ep_expected = 0
        for i, bt in enumerate(batches):
            if wait and i > 0 and waiting:
                waiting, last = False, None  # reset between batches
            for t in range(bt["done"].shape[0]):
                o, a, r = bt["observation"][t, b], bt["action"][t, b], bt["reward"][t, b]
                pa, pr = bt["prev_action"][t, b], bt["prev_reward"][t, b]
                where = f"batch {i} step {t} env {b}"
                if waiting:
                    assert not o.any() and a == 0 and r == 0, f"{where}: wait must record zeros"
                    assert bt["done"][t, b], f"{where}: done must stay true while waiting"
                    assert (bt["terminated"][t, b], bt["truncated"][t, b]) == last[2:], where
                    for _, v in bt["agent_info"].items():
                        assert v[t, b] == 0, f"{where}: agent_info must be zero while waiting"
                    continue
                assert o[0] == seed + b, where
                if first_batch_fresh or i > 0 or t > 0:
                    assert o[1] == ep_expected, f"{where}: episode {o[1]} != {ep_expected}"
                if o[2] == 0:
                    assert pa == 0 and pr == 0, f"{where}: prev_* must be zero at an episode start"
                    assert last is None, f"{where}: an episode started without the last ending"
                elif last is not None:
                    assert pa == last[0] and pr == last[1], f"{where}: prev_* != last step's"
                    assert o[3] == last[0], f"{where}: obs must follow action[t-1]"
                if agent_rule:
                    assert a == (seed + b + int(o[2]) + int(pa)) % 3, f"{where}: action"
                    if "value" in bt["agent_info"]:
                        assert bt["agent_info"]["value"][t, b] == o[2] * 0.5, f"{where}: info"
                assert r == o[2] + 1, f"{where}: reward"
                assert bt["env_info"]["t"][t, b] == o[2] + 1, f"{where}: env_info t"
                L = lengths[(seed + b + int(o[1])) % len(lengths)]
                done = o[2] + 1 == L
                assert bt["done"][t, b] == done, f"{where}: done"
                assert bt["terminated"][t, b] == (done and L % 2 == 0), f"{where}: terminated"
                assert bt["truncated"][t, b] == (done and L % 2 == 1), f"{where}: truncated"
                last = (a, r, bt["terminated"][t, b], bt["truncated"][t, b])
                if done:
                    ep_expected = int(o[1]) + 1
                    if wait:
                        waiting = True
                    else:
                        last = None
                        if t + 1 < bt["done"].shape[0]:
                            nxt = bt["observation"][t + 1, b]
                            assert nxt[1] == o[1] + 1 and nxt[2] == 0, f"{where}: next episode"
                else:
                    ep_expected = int(o[1])


# -- hand-worked alignment -------------------------------------------------------------
def test_mid_batch_alignment_hand_worked():
    b0, b1, b2 = collect(env_fn=LEN23, n=3, **SMALL)
    # batch 0
    np.testing.assert_array_equal(b0["observation"], envcols(
        [[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]],
        [[1, 0, 0, 0], [1, 0, 1, 1], [1, 0, 2, 0], [1, 1, 0, 0]]))
    np.testing.assert_array_equal(b0["action"], envcols([0, 1, 0, 1], [1, 0, 0, 1]))
    np.testing.assert_array_equal(b0["reward"], envcols([1, 2, 1, 2], [1, 2, 3, 1]))
    np.testing.assert_array_equal(b0["done"], envcols([F, T_, F, F], [F, F, T_, F]))
    np.testing.assert_array_equal(b0["terminated"], envcols([F, T_, F, F], [F, F, F, F]))
    np.testing.assert_array_equal(b0["truncated"], envcols([F, F, F, F], [F, F, T_, F]))
    np.testing.assert_array_equal(b0["prev_action"], envcols([0, 0, 0, 0], [0, 1, 0, 0]))
    np.testing.assert_array_equal(b0["prev_reward"], envcols([0, 1, 0, 1], [0, 1, 2, 0]))
    np.testing.assert_array_equal(b0["env_info"]["t"], envcols([1, 2, 1, 2], [1, 2, 3, 1]))
    np.testing.assert_array_equal(b0["env_info"]["score"], b0["reward"])
    # batch 1: both envs finish an episode at step 0 that began in batch 0
    np.testing.assert_array_equal(b1["observation"], envcols(
        [[0, 1, 2, 1], [0, 2, 0, 0], [0, 2, 1, 0], [0, 3, 0, 0]],
        [[1, 1, 1, 1], [1, 2, 0, 0], [1, 2, 1, 1], [1, 2, 2, 0]]))
    np.testing.assert_array_equal(b1["action"], envcols([0, 0, 1, 0], [0, 1, 0, 0]))
    np.testing.assert_array_equal(b1["reward"], envcols([3, 1, 2, 1], [2, 1, 2, 3]))
    np.testing.assert_array_equal(b1["done"], envcols([T_, F, T_, F], [T_, F, F, T_]))
    np.testing.assert_array_equal(b1["terminated"], envcols([F, F, T_, F], [T_, F, F, F]))
    np.testing.assert_array_equal(b1["truncated"], envcols([T_, F, F, F], [F, F, F, T_]))
    # prev_* carry over the batch boundary (row 0) and are zero at each episode's first step
    np.testing.assert_array_equal(b1["prev_action"], envcols([1, 0, 0, 0], [1, 0, 1, 0]))
    np.testing.assert_array_equal(b1["prev_reward"], envcols([2, 0, 1, 0], [1, 0, 1, 2]))
    np.testing.assert_array_equal(b1["env_info"]["t"], envcols([3, 1, 2, 1], [2, 1, 2, 3]))
    # batch 2 row 0: env 1's episode ended on the last step of batch 1 -> prev zeros
    np.testing.assert_array_equal(b2["observation"][0], [[0, 3, 1, 0], [1, 3, 0, 0]])
    np.testing.assert_array_equal(b2["prev_action"][0], [0, 0])
    np.testing.assert_array_equal(b2["prev_reward"][0], [1, 0])
    # agent_info: what agent.step returned for each observation
    for bt in (b0, b1, b2):
        np.testing.assert_array_equal(bt["agent_info"]["value"], bt["observation"][..., 2] * 0.5)
        np.testing.assert_array_equal(bt["agent_info"]["logp"], -bt["observation"][..., 0])
        assert bt["agent_info"]["value"].dtype == np.float32
    # episodes, ordered by (step, env); Length/Return span the batch boundary
    assert [(t["Length"], t["Return"]) for t in b0["traj_infos"]] == [(2, 3.0), (3, 6.0)]
    assert [(t["Length"], t["Return"]) for t in b1["traj_infos"]] == [
        (3, 6.0), (2, 3.0), (2, 3.0), (3, 6.0)]


def test_wait_alignment_hand_worked():
    b0, b1, b2 = collect(env_fn=LEN23, n=3, reset_mode="wait", **SMALL)
    z = [0, 0, 0, 0]
    np.testing.assert_array_equal(b0["observation"], envcols(
        [[0, 0, 0, 0], [0, 0, 1, 0], z, z],
        [[1, 0, 0, 0], [1, 0, 1, 1], [1, 0, 2, 0], z]))
    np.testing.assert_array_equal(b0["action"], envcols([0, 1, 0, 0], [1, 0, 0, 0]))
    np.testing.assert_array_equal(b0["reward"], envcols([1, 2, 0, 0], [1, 2, 3, 0]))
    np.testing.assert_array_equal(b0["done"], envcols([F, T_, T_, T_], [F, F, T_, T_]))
    np.testing.assert_array_equal(b0["terminated"], envcols([F, T_, T_, T_], [F, F, F, F]))
    np.testing.assert_array_equal(b0["truncated"], envcols([F, F, F, F], [F, F, T_, T_]))
    np.testing.assert_array_equal(b0["prev_action"], envcols([0, 0, 0, 0], [0, 1, 0, 0]))
    np.testing.assert_array_equal(b0["prev_reward"], envcols([0, 1, 0, 0], [0, 1, 2, 0]))
    np.testing.assert_array_equal(b0["agent_info"]["value"], envcols([0, .5, 0, 0],
                                                                      [0, .5, 1, 0]))
    np.testing.assert_array_equal(b0["agent_info"]["logp"], envcols([0, 0, 0, 0],
                                                                     [-1, -1, -1, 0]))
    # batch 1 starts with each env's new episode (reset between batches), prev zeros
    np.testing.assert_array_equal(b1["observation"], envcols(
        [[0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 2, 1], z],
        [[1, 1, 0, 0], [1, 1, 1, 1], z, z]))
    np.testing.assert_array_equal(b1["action"], envcols([0, 1, 0, 0], [1, 0, 0, 0]))
    np.testing.assert_array_equal(b1["reward"], envcols([1, 2, 3, 0], [1, 2, 0, 0]))
    np.testing.assert_array_equal(b1["done"], envcols([F, F, T_, T_], [F, T_, T_, T_]))
    np.testing.assert_array_equal(b1["terminated"], envcols([F, F, F, F], [F, T_, T_, T_]))
    np.testing.assert_array_equal(b1["truncated"], envcols([F, F, T_, T_], [F, F, F, F]))
    np.testing.assert_array_equal(b1["prev_action"], envcols([0, 0, 1, 0], [0, 1, 0, 0]))
    np.testing.assert_array_equal(b1["prev_reward"], envcols([0, 1, 2, 0], [0, 1, 0, 0]))
    np.testing.assert_array_equal(b2["observation"][0], [[0, 2, 0, 0], [1, 2, 0, 0]])
    np.testing.assert_array_equal(b2["prev_action"][0], [0, 0])
    np.testing.assert_array_equal(b2["prev_reward"][0], [0, 0])
    assert [(t["Length"], t["Return"]) for t in b0["traj_infos"]] == [(2, 3.0), (3, 6.0)]
    # batch 1: env 1 ends at step 1, env 0 at step 2 -> (step, env) order
    assert [(t["Length"], t["Return"]) for t in b1["traj_infos"]] == [(2, 3.0), (3, 6.0)]


def test_wait_env_info_zero_while_waiting():
    batches = collect(env_fn=LEN23, n=3, reset_mode="wait", **SMALL)
    for i, bt in enumerate(batches):
        for t in range(1, 4):
            waiting = bt["done"][t - 1]
            for name, v in bt["env_info"].items():
                np.testing.assert_array_equal(v[t][waiting], 0,
                                              err_msg=f"batch {i} step {t} env_info {name}")


@pytest.mark.parametrize("reset_mode", RESET_MODES)
@pytest.mark.parametrize("T,B,lengths", [(4, 2, (2, 3)), (7, 3, (3, 5, 4)), (1, 2, (1, 2)),
                                         (5, 4, (1, 1, 6))])
def test_counting_invariants(reset_mode, T, B, lengths):
    batches = collect(env_fn=functools.partial(CountingEnv, lengths=lengths), n=4,
                      batch_T=T, batch_B=B, reset_mode=reset_mode, seed=3)
    check_counting_invariants(batches, lengths, reset_mode == "wait", seed=3)


class NoInfoCountingEnv(CountingEnv):
    """CountingEnv without env_info: reset mode then takes the collector's fast loop."""

    def step(self, action):
        o, r, te, tr, _ = super().step(action)
        return o, r, te, tr, {}


@pytest.mark.parametrize("final_observation", [False, True])
@pytest.mark.parametrize("T,B,lengths", [(4, 2, (2, 3)), (7, 3, (3, 5, 4)), (5, 4, (1, 1, 6))])
def test_an_env_without_info_gives_the_batches_of_one_with_info(final_observation, T, B,
                                                                  lengths):
    kw = dict(batch_T=T, batch_B=B, seed=3, final_observation=final_observation)
    with sampling.make_sampler("serial", functools.partial(NoInfoCountingEnv, lengths=lengths),
                               CountingAgent(), **kw) as s:
        fast = [snapshot(s.obtain_samples(i)) for i in range(4)]
    general = collect(env_fn=functools.partial(CountingEnv, lengths=lengths), n=4, **kw)
    for bf, bg in zip(fast, general):
        bg = dict(bg, env_info={})
        assert_batches_equal(dict(bf, env_info={}), bg)


@pytest.mark.parametrize("reset_mode", RESET_MODES)
def test_final_observation(reset_mode):
    b0, b1 = collect(env_fn=LEN23, final_observation=True, reset_mode=reset_mode, **SMALL)
    fo0 = np.zeros((4, 2, 4), np.float32)
    fo0[1, 0] = [0, 0, 2, 1]  # the obs env 0 returned on the step that ended its episode
    fo0[2, 1] = [1, 0, 3, 0]
    fo1 = np.zeros((4, 2, 4), np.float32)
    if reset_mode == "mid_batch":
        fo1[0, 0], fo1[2, 0] = [0, 1, 3, 0], [0, 2, 2, 1]
        fo1[0, 1], fo1[3, 1] = [1, 1, 2, 0], [1, 2, 3, 0]
    else:
        fo1[2, 0] = [0, 1, 3, 0]
        fo1[1, 1] = [1, 1, 2, 0]
    for bt, want in ((b0, fo0), (b1, fo1)):
        assert bt["final_observation"].dtype == np.float32
        np.testing.assert_array_equal(bt["final_observation"], want)
        # set exactly where an episode ended (in wait mode: not on the waiting steps)
        ends = bt["done"].copy()
        if reset_mode == "wait":
            ends[1:] &= ~bt["done"][:-1]
        np.testing.assert_array_equal(bt["final_observation"].any(-1), ends)


def test_final_observation_absent_by_default():
    (b0,) = collect(env_fn=LEN23, n=1, **SMALL)
    assert "final_observation" not in b0 and "bootstrap_value" not in b0


# -- episode stats ---------------------------------------------------------------------
@pytest.mark.parametrize("reset_mode", RESET_MODES)
def test_returns_across_batch_boundaries(reset_mode):
    lengths, discount, B = (3, 7, 4, 9), 0.9, 3
    batches = collect(env_fn=functools.partial(CountingEnv, lengths=lengths), n=6, batch_T=5,
                      batch_B=B, reset_mode=reset_mode, discount=discount)
    # Sum rewards per env from the batches themselves, episode by episode.
    acc = [[] for _ in range(B)]
    finished = []  # per batch: (step, env, rewards) of each episode that ended
    for bt in batches:
        ended_here = []
        for t in range(5):
            for b in range(B):
                if reset_mode == "wait" and t > 0 and bt["done"][t - 1, b]:
                    continue
                acc[b].append(float(bt["reward"][t, b]))
                if bt["done"][t, b]:
                    ended_here.append((t, b, acc[b]))
                    acc[b] = []
        finished.append(ended_here)
    n_eps = 0
    for i, bt in enumerate(batches):
        got = bt["traj_infos"]
        want = finished[i]
        assert len(got) == len(want), f"batch {i}"
        for g, (_t, _b, rews) in zip(got, want):
            r = np.array(rews)
            assert g["Length"] == len(r)
            assert g["Return"] == pytest.approx(r.sum())
            assert g["NonzeroRewards"] == int(np.count_nonzero(r))
            assert g["DiscountedReturn"] == pytest.approx(float(r @ discount ** np.arange(len(r))))
            assert g["Length"] in lengths  # a whole episode, never a piece of one
            n_eps += 1
    assert n_eps >= 6
    assert any(len(ep[2]) > 5 for eps in finished for ep in eps), "no episode spans batches"


class EachUpdate(sampling.TrajInfo):
    """Overrides update, so the collector calls it with a Segment as each episode ends;
    counts the calls (a stat of its own)."""

    def update(self, segment):
        self.Updates = getattr(self, "Updates", 0) + 1
        super().update(segment)


class Extra(sampling.TrajInfo):
    """Adds a stat in __init__ only: its stats are added at the end of each batch."""

    def __init__(self, discount=0.99):
        super().__init__(discount)
        self.Tag = "x"


@pytest.mark.parametrize("kind", ["serial", "cpu"])
@pytest.mark.parametrize("reset_mode", RESET_MODES)
def test_stats_at_batch_end_equal_stats_per_episode(kind, reset_mode):
    """TrajInfo (and a subclass that keeps update and terminate) gets its rewards at the end
    of the batch; a class with its own update gets a Segment as each episode ends. Both give
    the same floats, bit for bit, over episodes that span batches (rewards vary per step)."""
    kw = dict(env_fn=functools.partial(CountingEnv, lengths=(3, 7, 4, 9)), n=6, batch_T=5,
              batch_B=4, reset_mode=reset_mode, discount=0.9, kind=kind)
    got = {cls: [bt["traj_infos"] for bt in collect(traj_info=cls, **kw)]
           for cls in (sampling.TrajInfo, EachUpdate, Extra)}
    assert sum(map(len, got[sampling.TrajInfo])) >= 6
    for cls, own in ((EachUpdate, "Updates"), (Extra, "Tag")):
        assert [[{k: v for k, v in s.items() if k != own} for s in bt] for bt in got[cls]] \
            == got[sampling.TrajInfo]


def test_update_patched_onto_trajinfo_or_set_on_the_instance_is_still_called(monkeypatch):
    """A user who wraps TrajInfo.update (a mock, a logging wrapper) or sets update on an
    instance gets every call, as before stats were added per batch."""
    calls = []
    original = sampling.TrajInfo.update

    def logging_update(self, segment):
        calls.append(len(segment))
        original(self, segment)

    class OnInstance(sampling.TrajInfo):
        def __init__(self, discount=0.99):
            super().__init__(discount)
            self.Segments = 0
            self.update = self._count

        def _count(self, segment):
            self.Segments += 1
            original(self, segment)

    kw = dict(env_fn=functools.partial(CountingEnv, lengths=(3,)), n=1, batch_T=4, batch_B=2)
    bt, = collect(traj_info=OnInstance, **kw)
    assert [t["Segments"] for t in bt["traj_infos"]] == [1, 1]
    monkeypatch.setattr(sampling.TrajInfo, "update", logging_update)
    bt, = collect(**kw)
    assert len(bt["traj_infos"]) == 2
    assert calls == [3, 3, 1, 1]  # each episode as it ended, then the open ones at batch end


def test_own_update_is_called_as_each_episode_ends():
    bt, = collect(env_fn=functools.partial(CountingEnv, lengths=(3,)), n=1, batch_T=4,
                  batch_B=2, traj_info=EachUpdate)
    assert len(bt["traj_infos"]) == 2
    assert [t["Updates"] for t in bt["traj_infos"]] == [1, 1]  # one segment each, here


class CheckedIdTraj(IdTraj):
    """IdTraj (tests/helpers.py) that also checks each segment it is given."""

    def update(self, segment):
        assert len(segment) == len(segment.reward) == len(segment.action)
        # any batch field, not only the usual ones (no decorrelation segments here)
        assert len(segment.done) == len(segment) and not segment.done[:-1].any()
        np.testing.assert_array_equal(copy.deepcopy(segment).reward, segment.reward)
        with pytest.raises(AttributeError):
            getattr(segment, "no_such_field")  # noqa: B009
        super().update(segment)


def test_custom_traj_info_and_order():
    lengths = (2, 6, 3)
    batches = collect(env_fn=functools.partial(CountingEnv, lengths=lengths), n=4, batch_T=4,
                      batch_B=3, traj_info=CheckedIdTraj)
    seen = 0
    for bt in batches:
        stats = bt["traj_infos"]
        ends = [(t, b) for t in range(4) for b in range(3) if bt["done"][t, b]]
        assert [s["EnvId"] for s in stats] == [b for _, b in ends]  # (step, env) order
        for s in stats:
            assert s["StartT"] == 0 and s["FinalT"] == s["Length"]
            assert s["Length"] == lengths[(s["EnvId"] + s["Episode"]) % 3]
            assert s["Segments"] >= 1
            assert set(s) >= {"Length", "Return", "NonzeroRewards", "DiscountedReturn"}
            seen += 1
    assert seen > 5
    assert any(s["Segments"] == 2 for bt in batches for s in bt["traj_infos"])


# -- seeding ---------------------------------------------------------------------------
def test_same_seed_identical_different_seed_differs():
    kw = dict(env_fn=sampling.CartPole, agent=cartpole_policy, n=3, batch_T=30, batch_B=3)
    a = collect(seed=5, **kw)
    b = collect(seed=5, **kw)
    c = collect(seed=6, **kw)
    for x, y in zip(a, b):
        assert_batches_equal(x, y)
    assert not np.array_equal(a[0]["observation"], c[0]["observation"])
    # envs of one sampler are seeded differently, too
    assert len({tuple(r) for r in a[0]["observation"][0]}) == 3


class RecordingEnv(CountingEnv):
    """Logs its calls in a shared list (serial sampler: every env lives in this process)."""

    log: list = []

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list = []
        RecordingEnv.log.append(self)

    def reset(self, *, seed=None, options=None):
        self.calls.append(("reset", seed))
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self.calls.append(("step",))
        return super().step(action)

    def close(self):
        self.calls.append(("close",))


def test_env_b_first_reset_with_seed_plus_b():
    RecordingEnv.log = []
    seed, B = 11, 4
    with sampling.make_sampler("serial", RecordingEnv, CountingAgent(), batch_T=3, batch_B=B,
                               seed=seed) as s:
        batch = s.obtain_samples(0)
        np.testing.assert_array_equal(batch.observation[0, :, 0], seed + np.arange(B))
        envs = [e for e in RecordingEnv.log if ("close",) not in e.calls]
    assert len(envs) == B  # the probe env is a separate one, closed after probing
    # a training env is never stepped before its seeded reset
    assert [e.calls[0] for e in envs] == [("reset", seed + b) for b in range(B)]


# -- decorrelation ---------------------------------------------------------------------
def test_decorrelation_reproducible_and_carries_prev():
    kw = dict(env_fn=CountingEnv, n=2, batch_T=5, batch_B=8, seed=2)
    a = collect(max_decorrelation_steps=20, **kw)
    b = collect(max_decorrelation_steps=20, **kw)
    plain = collect(**kw)
    other = collect(max_decorrelation_steps=20, **dict(kw, seed=3))
    for x, y in zip(a, b):
        assert_batches_equal(x, y)
    assert not np.array_equal(a[0]["observation"], plain[0]["observation"])
    assert not np.array_equal(a[0]["observation"][..., 1:], other[0]["observation"][..., 1:])
    obs0 = a[0]["observation"][0]
    mid = obs0[:, 2] > 0  # envs whose open episode took random steps before the batch
    assert mid.any(), "no env is mid-episode after decorrelation"
    # prev_action/prev_reward are the last random step's action and reward
    np.testing.assert_array_equal(a[0]["prev_action"][0][mid], obs0[mid, 3])
    np.testing.assert_array_equal(a[0]["prev_reward"][0][mid], obs0[mid, 2])
    np.testing.assert_array_equal(a[0]["prev_action"][0][~mid], 0)
    np.testing.assert_array_equal(a[0]["prev_reward"][0][~mid], 0)
    assert (a[0]["prev_action"][0] != 0).any(), "no random step with a nonzero action"
    # episodes that began during decorrelation keep their random steps in their stats
    lengths = (3, 5, 4)
    for bt in a:
        for s in bt["traj_infos"]:
            assert s["Length"] in lengths
            assert s["Return"] == s["Length"] * (s["Length"] + 1) / 2
    check_counting_invariants(a, lengths, wait=False, seed=2, first_batch_fresh=False)


# -- evaluation ------------------------------------------------------------------------
def eval_schedule(env_ids: list, lengths: tuple, max_T: int, max_traj: int | None) -> list:
    """Expected (env_id, Length) of finished eval episodes, in (step, env) order."""
    ends = []
    for e, eid in enumerate(env_ids):
        step, k = -1, 0
        while True:
            L = lengths[(eid + k) % len(lengths)]
            step += L
            if step >= max_T:
                break
            ends.append((step, e, eid, L))
            k += 1
    ends.sort()
    if max_traj is not None:
        ends = ends[:max_traj]
    return [(eid, L) for _, _, eid, L in ends]


@pytest.mark.parametrize("rule", [dict(eval_max_trajectories=4),
                                  dict(eval_max_steps=15),
                                  dict(eval_max_steps=30, eval_max_trajectories=5)])
def test_evaluation_stopping_rules_and_seeds(rule):
    seed, B, E, lengths = 3, 2, 3, (3, 5, 4)
    agent = CountingAgent()
    with sampling.make_sampler("serial", CountingEnv, agent, batch_T=4, batch_B=B, seed=seed,
                               eval_n_envs=E, traj_info=CheckedIdTraj, **rule) as s:
        s.obtain_samples(0)
        res = s.evaluate_agent(7)
        assert agent.mode == ("eval", 7)
    max_T = rule["eval_max_steps"] // E if "eval_max_steps" in rule else 10**6
    want = eval_schedule([seed + B + e for e in range(E)], lengths, max_T,
                         rule.get("eval_max_trajectories"))
    assert [(r.EnvId, r.Length) for r in res] == want
    assert all(r.StartT == 0 and r.FinalT == r.Length for r in res)
    if "eval_max_trajectories" in rule:
        assert len(res) <= rule["eval_max_trajectories"]


def test_training_unaffected_by_evaluation():
    agent = CountingAgent()
    kw = dict(batch_T=4, batch_B=2, eval_n_envs=2, eval_max_trajectories=3)
    with sampling.make_sampler("serial", CountingEnv, agent, **kw) as s:
        first = snapshot(s.obtain_samples(0))
        s.evaluate_agent(0)
        second = snapshot(s.obtain_samples(1))
        assert agent.mode == ("sample", 1)
    ref = collect(env_fn=CountingEnv, n=2, **kw)
    assert_batches_equal(first, ref[0])
    assert_batches_equal(second, ref[1])


def test_evaluation_uses_eval_env_fn_and_is_repeatable():
    made = []

    def eval_env_fn():
        made.append(1)
        return CountingEnv(lengths=(2,))

    with sampling.make_sampler("serial", CountingEnv, CountingAgent(), batch_T=4, batch_B=2,
                               eval_env_fn=eval_env_fn, eval_n_envs=2,
                               eval_max_trajectories=6, traj_info=CheckedIdTraj) as s:
        first = s.evaluate_agent(0)
        second = s.evaluate_agent(1)
    assert len(made) == 2  # eval envs are made once (the probe env comes from env_fn)
    assert [r.Length for r in first] == [2] * 6 == [r.Length for r in second]
    assert [r.EnvId for r in first] == [2, 3] * 3 == [r.EnvId for r in second]
    # seeded on the first evaluation only: the second one continues the envs' episodes
    assert [r.Episode for r in first] == [0, 0, 1, 1, 2, 2]
    assert min(r.Episode for r in second) > 2


# -- bootstrap value -------------------------------------------------------------------
def test_bootstrap_value_is_value_of_next_observation():
    batches = collect(env_fn=LEN23, bootstrap_value=True, n=3, **SMALL)
    np.testing.assert_array_equal(batches[0]["bootstrap_value"], [102, 101])
    np.testing.assert_array_equal(batches[1]["bootstrap_value"], [101, 100])
    for cur, nxt in zip(batches, batches[1:]):
        assert cur["bootstrap_value"].shape == (2,)
        np.testing.assert_array_equal(cur["bootstrap_value"], nxt["observation"][0][:, 2] + 100)


def test_bootstrap_value_gets_env_ids_when_accepted():
    class Agent(CountingAgent):
        def value(self, observation, prev_action, prev_reward, env_ids):
            return env_ids.astype(np.float32) * 10 + observation[:, 2]

    batches = collect(env_fn=LEN23, agent=Agent(), bootstrap_value=True, n=2, **SMALL)
    np.testing.assert_array_equal(batches[0]["bootstrap_value"], [2, 11])


# -- dict observations -----------------------------------------------------------------
@pytest.mark.parametrize("reset_mode", RESET_MODES)
def test_dict_observations(reset_mode):
    batches = collect(env_fn=DictObsEnv, n=3, batch_T=5, batch_B=3, reset_mode=reset_mode,
                      final_observation=True)
    for bt in batches:
        obs = bt["observation"]
        assert set(obs) == {"vec", "img", "n"} and set(obs["n"]) == {"k"}
        assert obs["vec"].dtype == np.float32 and obs["vec"].shape == (5, 3, 4)
        assert obs["img"].dtype == np.uint8 and obs["img"].shape == (5, 3, 2, 3)
        assert obs["n"]["k"].dtype == np.int64 and obs["n"]["k"].shape == (5, 3)
        live = obs["vec"][..., 0] == np.arange(3)  # not a zero row of a waiting env
        if reset_mode == "mid_batch":
            assert live.all()
        vec = obs["vec"]
        want_img = ((vec[..., 2] + 10 * vec[..., 0]) % 256).astype(np.uint8)
        np.testing.assert_array_equal(obs["img"], np.broadcast_to(want_img[..., None, None],
                                                                  (5, 3, 2, 3)))
        np.testing.assert_array_equal(obs["n"]["k"], vec[..., 2].astype(np.int64))
        fo = bt["final_observation"]
        assert fo["img"].dtype == np.uint8 and fo["n"]["k"].dtype == np.int64
        ends = fo["vec"].any(-1)
        assert ends.any()
        np.testing.assert_array_equal(fo["n"]["k"][ends], fo["vec"][ends][:, 2])
        np.testing.assert_array_equal(fo["img"][~ends], 0)
    vecs = [{"observation": bt["observation"]["vec"], **{k: bt[k] for k in bt if k not in (
        "observation", "final_observation")}} for bt in batches]
    check_counting_invariants(vecs, (3, 5, 4), reset_mode == "wait")


# -- plain callable policy and agent_info ----------------------------------------------
def test_plain_callable_policy():
    batches = collect(env_fn=LEN23, agent=counting_policy, n=2, **SMALL)
    for bt in batches:
        obs = bt["observation"]
        np.testing.assert_array_equal(bt["action"], (obs[..., 0] + obs[..., 2]) % 3)
        assert bt["agent_info"] == {}
    check_counting_invariants(batches, (2, 3), wait=False, agent_rule=False)


def test_plain_callable_policy_wait_mode():
    batches = collect(env_fn=LEN23, agent=counting_policy, n=3, reset_mode="wait", **SMALL)
    check_counting_invariants(batches, (2, 3), wait=True, agent_rule=False)


def test_agent_info_nested_dict_recorded():
    class Agent(CountingAgent):
        def step(self, observation, prev_action, prev_reward):
            a, info = super().step(observation, prev_action, prev_reward)
            return a, {"pi": {"logits": np.stack([observation[:, 2]] * 3, -1)},
                       "n": prev_reward.astype(np.float64)}

    (bt,) = collect(env_fn=LEN23, agent=Agent(), n=1, **SMALL)
    assert bt["agent_info"]["pi"]["logits"].shape == (4, 2, 3)
    assert bt["agent_info"]["pi"]["logits"].dtype == np.float32
    assert bt["agent_info"]["n"].dtype == np.float64
    np.testing.assert_array_equal(bt["agent_info"]["pi"]["logits"][..., 1],
                                  bt["observation"][..., 2])
    np.testing.assert_array_equal(bt["agent_info"]["n"], bt["prev_reward"])


def test_agent_hooks_called():
    agent = CountingAgent()
    with sampling.make_sampler("serial", LEN23, agent, **SMALL) as s:
        s.obtain_samples(0)
        s.obtain_samples(5)
        assert agent.mode == ("sample", 5)
    assert agent.calls[0] == ("reset",)
    # reset_one(b) before the first step of each new episode: env 0 at batch 0 step 2,
    # env 1 at step 3, then in batch 1 both at step 1, env 0 at step 3
    assert agent.calls[1:] == [("reset_one", 0), ("reset_one", 1), ("reset_one", 0),
                               ("reset_one", 1), ("reset_one", 0)]


def test_batch_attribute_access_and_views():
    with sampling.make_sampler("serial", LEN23, CountingAgent(), **SMALL) as s:
        b = s.obtain_samples(0)
        assert b.observation is b["observation"] and b.traj_infos is b["traj_infos"]
        with pytest.raises(AttributeError):
            _ = b.no_such_field
        for k in ("observation", "action", "reward", "done", "terminated", "truncated",
                  "prev_action", "prev_reward"):
            assert b[k].shape[:2] == (4, 2), k
        assert b.reward.dtype == np.float32 and b.done.dtype == bool
        assert b.action.dtype == np.int64


# -- gymnasium CartPole-v1 -------------------------------------------------------------
def jitter_policy(observation):
    """Deterministic but erratic: CartPole episodes end within a few dozen steps."""
    return (np.abs(observation[:, 0] * 1e6).astype(np.int64) % 2).astype(np.int64)


def check_cartpole(batches: list, wait: bool) -> int:
    """Alignment invariants that hold for any CartPole run; returns episodes seen."""
    T, B = batches[0]["done"].shape
    n_eps = 0
    for b in range(B):
        start, last, count, waiting = True, None, 0, False
        for i, bt in enumerate(batches):
            if wait and waiting:
                start, waiting = True, False
            for t in range(T):
                where = f"batch {i} step {t} env {b}"
                o = bt["observation"][t, b]
                if waiting:
                    assert not o.any() and bt["reward"][t, b] == 0 and bt["done"][t, b], where
                    assert bt["action"][t, b] == 0, where
                    if "x" in bt["agent_info"]:
                        assert bt["agent_info"]["x"][t, b] == 0, where
                    continue
                if start:
                    assert bt["prev_action"][t, b] == 0 and bt["prev_reward"][t, b] == 0, where
                    assert np.all(np.abs(o) <= 0.05), f"{where}: not a reset observation"
                else:
                    assert bt["prev_action"][t, b] == last and bt["prev_reward"][t, b] == 1, where
                assert bt["action"][t, b] == jitter_policy(o[None])[0], where
                if "x" in bt["agent_info"]:
                    assert bt["agent_info"]["x"][t, b] == o[0], where
                assert bt["reward"][t, b] == 1.0, where
                assert bt["done"][t, b] == (bt["terminated"][t, b] or bt["truncated"][t, b])
                count += 1
                last, start = bt["action"][t, b], False
                if bt["done"][t, b]:
                    fo = bt["final_observation"][t, b]
                    if bt["terminated"][t, b]:
                        assert abs(fo[0]) > 2.4 or abs(fo[2]) > 0.2094, where
                    start, waiting = True, wait
                    mine = [s for s in bt["traj_infos"] if s["_t"] == t and s["_b"] == b]
                    assert len(mine) == 1, where
                    assert mine[0]["Length"] == mine[0]["Return"] == count, where
                    count = 0
                    n_eps += 1
    return n_eps


def _tag_ends(batches):
    for bt in batches:
        ends = [(t, b) for t in range(bt["done"].shape[0]) for b in range(bt["done"].shape[1])
                if bt["done"][t, b] and not (t > 0 and bt["done"][t - 1, b] and not np.any(
                    bt["observation"][t, b]))]
        assert len(ends) == len(bt["traj_infos"])
        for s, (t, b) in zip(bt["traj_infos"], ends):
            s["_t"], s["_b"] = t, b


@pytest.mark.parametrize("reset_mode", RESET_MODES)
def test_gymnasium_cartpole_invariants(reset_mode):
    env_fn = gym_cartpole()
    kw = dict(env_fn=env_fn, agent=PolicyAgent(jitter_policy, {"x": 0}), n=4, batch_T=25,
              batch_B=3, reset_mode=reset_mode, final_observation=True)
    batches = collect(seed=1, **kw)
    _tag_ends(batches)
    assert check_cartpole(batches, reset_mode == "wait") >= 3
    assert batches[0]["observation"].dtype == np.float32
    again = collect(seed=1, **kw)
    for x, y in zip(batches, again):
        for s in x["traj_infos"]:
            del s["_t"], s["_b"]
        assert_batches_equal(x, y)
    other = collect(seed=2, **kw)
    assert not np.array_equal(batches[0]["observation"], other[0]["observation"])


def test_builtin_cartpole_invariants():
    batches = collect(env_fn=sampling.CartPole, agent=jitter_policy, n=4, batch_T=25,
                      batch_B=3, seed=1, final_observation=True)
    _tag_ends(batches)
    assert check_cartpole(batches, False) >= 3
