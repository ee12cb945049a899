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


# -- the sampler with vector envs ---------------------------------------------------------
import functools  # noqa: E402

import sampling  # noqa: E402
from tests.helpers import (  # noqa: E402
    METHODS,
    PARALLEL,
    CountingAgent,
    CountingEnv,
    DictObsEnv,
    IdTraj,
    assert_runs_equal,
    cartpole_policy,
    snapshot,
    vectorized,
)

pytestmark = pytest.mark.usefixtures("no_leaks")


class CartPoleAgent:
    """Deterministic, with a value: the policy of tests.helpers, value = sum of obs."""

    def step(self, observation, prev_action, prev_reward):
        return cartpole_policy(observation), {"lean": observation[:, 2].copy()}

    def value(self, observation, prev_action, prev_reward):
        return observation.sum(-1)


def _gym_vector(n, max_episode_steps, autoreset="SAME_STEP"):
    gym = pytest.importorskip("gymnasium")
    mode = getattr(gym.vector.AutoresetMode, autoreset)
    return functools.partial(gym.make_vec, "CartPole-v1", num_envs=n, vectorization_mode="sync",
                             vector_kwargs={"autoreset_mode": mode},
                             max_episode_steps=max_episode_steps)


def _gym_single(max_episode_steps):
    gym = pytest.importorskip("gymnasium")
    return functools.partial(gym.make, "CartPole-v1", max_episode_steps=max_episode_steps)


COUNTING = functools.partial(CountingEnv, lengths=(3, 5, 4, 7))
CARTPOLE = functools.partial(sampling.CartPole, max_episode_steps=30)
EVAL = dict(eval_n_envs=4, eval_max_steps=120)

# name -> () -> (vector env_fn, the same envs single, agent factory, options)
CONFIGS = {
    "cartpole_same_step": lambda: (
        functools.partial(sampling.envs.make_vector_cartpole, 2, max_episode_steps=30),
        CARTPOLE, CartPoleAgent, dict(final_observation=True, bootstrap_value=True, **EVAL)),
    "cartpole_disabled": lambda: (
        functools.partial(sampling.envs.make_vector_cartpole, 2, max_episode_steps=30,
                          autoreset_mode="Disabled"),
        CARTPOLE, CartPoleAgent, dict(final_observation=True, bootstrap_value=True, **EVAL)),
    "counting": lambda: (vectorized(COUNTING, 2), COUNTING, CountingAgent,
                         dict(final_observation=True, bootstrap_value=True, traj_info=IdTraj,
                              **EVAL)),
    "counting_disabled_dict_obs": lambda: (
        vectorized(DictObsEnv, 2, "Disabled"), DictObsEnv, CountingAgent,
        dict(final_observation=True)),
    "gymnasium_sync": lambda: (_gym_vector(2, 30), _gym_single(30), CartPoleAgent,
                               dict(final_observation=True, bootstrap_value=True, **EVAL)),
}
SIZE = dict(batch_T=20, batch_B=4, seed=5)


def _run(kind, env_fn, agent, n=3, **kw) -> tuple:
    with sampling.make_sampler(kind, env_fn, agent, **SIZE, **kw) as s:
        batches = [snapshot(b) for b in s.steps(n)]
        evals = ([[t.stats() for t in s.evaluate_agent(i)] for i in range(2)]
                 if kw.get("eval_n_envs") else [])
    return batches, evals


_reference: dict = {}


def _single_reference(config: str) -> tuple:
    if config not in _reference:
        _, single, agent, kw = CONFIGS[config]()
        _reference[config] = _run("serial", single, agent(), **kw)
    return _reference[config]


def _cases() -> list:
    out = []
    for config in CONFIGS:
        out.append(pytest.param("serial", None, config, id=f"serial-{config}"))
        for kind in PARALLEL:
            for method in METHODS:
                if method == "forkserver" and config not in ("counting", "gymnasium_sync"):
                    continue  # worker code runs the same after the start: fork and spawn cover it
                out.append(pytest.param(kind, method, config, id=f"{kind}-{method}-{config}"))
    return out


@pytest.mark.parametrize("kind,start_method,config", _cases())
def test_vector_envs_give_the_batches_of_their_single_envs(kind, start_method, config):
    """The master test, extended: a vector env made of n single envs gives bit-identical
    batches, episode stats and evaluations to those n single envs, in every kind."""
    vector, _, agent, kw = CONFIGS[config]()
    ref_batches, ref_evals = _single_reference(config)
    extra = {} if kind == "serial" else dict(n_workers=2, start_method=start_method)
    batches, evals = _run(kind, vector, agent(), **kw, **extra)
    assert_runs_equal(batches, ref_batches)
    assert evals == ref_evals
    assert sum(len(b["traj_infos"]) for b in ref_batches) >= 4  # episodes ended mid-batch
    assert any(b["done"][:-1].any() for b in ref_batches)  # ...and not only at the last step
    if evals:
        assert evals[0] and evals[1]
    if config == "counting":  # infos and agent_info per sub-env, final observations
        assert batches[0]["env_info"]["t"].any() and batches[0]["agent_info"]
        assert batches[0]["final_observation"].any()
