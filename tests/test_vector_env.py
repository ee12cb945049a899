"""The built-in vectorized CartPole: sub-env i is a CartPole, step for step."""
from __future__ import annotations

import numpy as np
import pytest

from sampling.envs import AUTORESET_MODES, CartPole, VectorCartPole, make_vector_cartpole

N, STEPS = 5, 3000


def _actions(seed=0):
    return np.random.default_rng(seed).integers(0, 2, size=(STEPS, N))


def test_same_step_matches_single_cartpoles():
    vec = VectorCartPole(N, max_episode_steps=60)
    singles = [CartPole(max_episode_steps=60) for _ in range(N)]
    obs, info = vec.reset(seed=[10 + i for i in range(N)])
    assert info == {} and obs.dtype == np.float32 and obs.shape == (N, 4)
    np.testing.assert_array_equal(obs, [e.reset(seed=10 + i)[0] for i, e in enumerate(singles)])
    ends = 0
    for a in _actions():
        obs, rew, term, trunc, info = vec.step(a)
        for i, env in enumerate(singles):
            o, r, te, tr, _ = env.step(int(a[i]))
            assert (rew[i], term[i], trunc[i]) == (r, te, tr)
            if te or tr:
                ends += 1
                assert info["_final_obs"][i]
                np.testing.assert_array_equal(info["final_obs"][i], o)
                o = env.reset()[0]  # the next episode, from the sub-env's own stream
            else:
                assert not info or not info["_final_obs"][i]
            np.testing.assert_array_equal(obs[i], o)
    assert ends > 50  # episodes end often (falls, and truncation at 60 steps)


def test_disabled_leaves_resets_to_the_caller():
    vec = VectorCartPole(N, max_episode_steps=40, autoreset_mode="Disabled")
    singles = [CartPole(max_episode_steps=40) for _ in range(N)]
    vec.reset(seed=3)
    for i, env in enumerate(singles):
        env.reset(seed=3 + i)
    for a in _actions(1)[:1000]:
        obs, rew, term, trunc, info = vec.step(a)
        assert info == {}
        done = term | trunc
        restarted = {}
        for i, env in enumerate(singles):
            o, r, te, tr, _ = env.step(int(a[i]))
            np.testing.assert_array_equal(obs[i], o)
            assert (rew[i], term[i], trunc[i]) == (r, te, tr)
            if te or tr:
                restarted[i] = env.reset()[0]
        if done.any():
            obs, _ = vec.reset(options={"reset_mask": done})
            assert sorted(restarted) == list(np.flatnonzero(done))
            for i, o in restarted.items():
                np.testing.assert_array_equal(obs[i], o)


def test_next_step_resets_at_the_following_call():
    vec = VectorCartPole(2, max_episode_steps=3, autoreset_mode="NextStep")
    vec.reset(seed=0)
    for _ in range(3):
        _, rew, _, trunc, _ = vec.step(np.zeros(2, np.int64))
    assert trunc.all() and (rew == 1.0).all()
    obs, rew, term, trunc, _ = vec.step(np.zeros(2, np.int64))  # the reset "step"
    assert (rew == 0.0).all() and not term.any() and not trunc.any()
    assert (np.abs(obs) <= 0.05).all()  # a new episode's first observation


@pytest.mark.parametrize("bad, match", [
    (dict(num_envs=0), "num_envs must be an int >= 1"),
    (dict(num_envs=2.0), "num_envs must be an int >= 1"),
    (dict(autoreset_mode="Sometimes"),
     "autoreset_mode must be one of " + ", ".join(AUTORESET_MODES)),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        make_vector_cartpole(**bad)


def test_bad_actions_and_seeds():
    vec = VectorCartPole(3)
    vec.reset(seed=0)
    for a in (np.zeros(2, np.int64), np.full(3, 2), np.zeros(3, np.float32)):
        with pytest.raises(ValueError, match="actions must be 3 ints in"):
            vec.step(a)
    with pytest.raises(ValueError, match="seed must be an int or 3 seeds"):
        vec.reset(seed=[1, 2])
    with pytest.raises(ValueError, match="reset_mask must be 3 bools"):
        vec.reset(options={"reset_mask": [True]})


def test_gymnasium_autoreset_enum_is_accepted():
    gym_vector = pytest.importorskip("gymnasium.vector")
    vec = VectorCartPole(2, autoreset_mode=gym_vector.AutoresetMode.SAME_STEP)
    assert vec.metadata["autoreset_mode"] is gym_vector.AutoresetMode.SAME_STEP
    vec.reset(seed=0)
    assert vec.step(np.ones(2, np.int64))[0].shape == (2, 4)
