"""Correct by default, for the agents and envs users actually bring: every worker draws its
own reproducible random stream, the sampler's probe consumes none of the user's, values of
the wrong type are refused (never coerced), every gymnasium action space works, and
Tuple observations keep their dtypes. The torch side (plain agents holding modules) is in
tests/test_torch.py.
"""
from __future__ import annotations

import collections
import random
import re
import warnings

import numpy as np
import pytest

import sampling
from sampling.spaces import Box, Discrete
from tests.helpers import (
    ALL_METHODS,
    KINDS,
    PARALLEL,
    CountingAgent,
    CountingEnv,
    assert_batches_equal,
    counting_policy,
    one_per,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("no_leaks")


def readme_policy(observation):
    """The README's quick-start policy, as users write it: the global numpy RNG."""
    return np.random.randint(2, size=len(observation))


def random_module_policy(observation):
    return np.array([random.randrange(2) for _ in range(len(observation))])


class OwnGeneratorsAgent:
    """Explores with generators it holds, all seeded with 0 as users do."""

    def __init__(self):
        self.rng = np.random.RandomState(0)
        self.gen = np.random.default_rng(0)
        self.py = random.Random(0)

    def step(self, observation, prev_action, prev_reward):
        n = len(observation)
        return self.rng.randint(2, size=n), {
            "gen": self.gen.random(n), "py": np.array([self.py.random() for _ in range(n)])}


def _halves_differ(x: np.ndarray) -> bool:
    half = x.shape[1] // 2
    return not np.array_equal(x[:, :half], x[:, half:])


def _cpu_batches(agent, start_method, n=2, **kw) -> list:
    with sampling.make_sampler("cpu", sampling.CartPole, agent, batch_T=32, batch_B=8,
                               n_workers=2, seed=3, start_method=start_method, **kw) as s:
        return [snapshot(b) for b in s.steps(n)]


# -- random streams ----------------------------------------------------------------------
@pytest.mark.start_method_matters  # fork's workers inherit the parent's streams; spawn's not
@pytest.mark.parametrize("policy", [readme_policy, random_module_policy])
def test_workers_draw_distinct_streams_the_same_under_every_start_method(policy):
    runs = {m: _cpu_batches(policy, m) for m in ALL_METHODS}
    first = runs[ALL_METHODS[0]]
    for batch in first:
        assert _halves_differ(batch["action"]), "both workers drew the same actions"
    for batches in runs.values():  # reproducible, and the same whatever the start method
        for a, b in zip(first, batches):
            assert_batches_equal(a, b)


@pytest.mark.start_method_matters  # the agent's generators: inherited or unpickled
@pytest.mark.parametrize("start_method", ALL_METHODS)
def test_generators_the_agent_holds_are_reseeded_per_worker(start_method):
    a = _cpu_batches(OwnGeneratorsAgent(), start_method)
    b = _cpu_batches(OwnGeneratorsAgent(), start_method)
    for batch in a:
        assert _halves_differ(batch["action"])
        assert _halves_differ(batch["agent_info"]["gen"])
        assert _halves_differ(batch["agent_info"]["py"])
    for x, y in zip(a, b):
        assert_batches_equal(x, y)


@pytest.mark.start_method_matters  # a fork copy and an unpickled copy draw the same
def test_random_agent_differs_per_worker_and_is_reproducible():
    space = sampling.CartPole().action_space
    a = _cpu_batches(sampling.RandomAgent(space, seed=0), "fork")
    b = _cpu_batches(sampling.RandomAgent(space, seed=0), ALL_METHODS[-1])
    for x, y in zip(a, b):
        assert _halves_differ(x["action"])
        assert_batches_equal(x, y)


def test_a_different_seed_gives_different_worker_streams():
    a = _cpu_batches(readme_policy, "fork", n=1)[0]["action"]
    with sampling.make_sampler("cpu", sampling.CartPole, readme_policy, batch_T=32,
                               batch_B=8, n_workers=2, seed=4, start_method="fork") as s:
        b = s.obtain_samples()["action"]
    assert not np.array_equal(a, b)


# -- the probe consumes nothing of the user's --------------------------------------------
def _states(agent) -> tuple:
    return (np.random.get_state()[1].copy(), random.getstate(),
            agent.rng.get_state()[1].copy(), agent.gen.bit_generator.state, agent.py.getstate())


@pytest.mark.parametrize("kind", KINDS + ["auto"])
def test_making_a_sampler_consumes_no_random_state(kind):
    agent = OwnGeneratorsAgent()

    def policy_step(observation, prev_action, prev_reward):  # also draws from the globals
        np.random.rand()
        random.random()
        return OwnGeneratorsAgent.step(agent, observation, prev_action, prev_reward)
    agent.step = policy_step
    np.random.seed(5)
    random.seed(5)
    before = _states(agent)
    with sampling.make_sampler(kind, sampling.CartPole, agent, batch_T=4, batch_B=4,
                               n_workers=2, start_method="fork"):
        after = _states(agent)
    for x, y in zip(before, after):
        np.testing.assert_equal(x, y)


def test_serial_sampler_reproduces_a_plain_loop():
    """A port of a plain loop (seed numpy, act with np.random) gives the same actions."""
    np.random.seed(0)
    env = sampling.CartPole()
    obs, _ = env.reset(seed=0)
    plain = []
    for _ in range(50):
        a = int(readme_policy(obs[None])[0])
        plain.append(a)
        obs, _, te, tr, _ = env.step(a)
        if te or tr:
            obs, _ = env.reset()
    np.random.seed(0)
    with sampling.make_sampler("serial", sampling.CartPole, readme_policy, batch_T=50,
                               batch_B=1, seed=0) as s:
        assert s.obtain_samples()["action"][:, 0].tolist() == plain


# -- parameters a cpu worker's copy cannot see -------------------------------------------
class NumpyLinearAgent:
    """A numpy policy trained in the parent: its weights are a plain attribute."""

    def __init__(self):
        self.w = np.zeros(4)

    def step(self, observation, prev_action, prev_reward):
        return (observation @ self.w > 0).astype(np.int64), None


class SharedLinearAgent(NumpyLinearAgent):
    def shared_arrays(self):
        return {"w": self.w}


def test_cpu_warns_once_about_arrays_it_cannot_mirror():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, even one already shown
        with sampling.make_sampler("cpu", sampling.CartPole, NumpyLinearAgent(), batch_T=4,
                                   batch_B=2, n_workers=2) as s:
            for _ in s.steps(3):
                pass
    mine = [w for w in caught if "float arrays outside any torch module" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert mine[0].category is UserWarning
    assert re.search(r"float arrays outside any torch module \(w\).*shared_arrays\(\)",
                     str(mine[0].message))


class NothingToMirrorAgent(NumpyLinearAgent):
    """Float arrays, and shared_arrays() saying there is nothing to mirror."""

    def shared_arrays(self):
        return {}


def test_shared_arrays_returning_nothing_silences_the_warning():
    """README: "shared_arrays() returning {} says 'nothing to mirror' and silences the
    warning": no warning, and indeed nothing is mirrored (the copies keep w as it was)."""
    agent = NothingToMirrorAgent()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sampling.make_sampler("cpu", sampling.CartPole, agent, batch_T=8, batch_B=4,
                                   n_workers=2, start_method="fork") as s:
            assert (s.obtain_samples()["action"] == 0).all()
            agent.w[0] = -1e9  # would act wherever the cart is left of centre
            assert (s.obtain_samples()["action"] == 0).all()


@pytest.mark.parametrize("kind,agent", [
    ("cpu", SharedLinearAgent()), ("cpu", readme_policy), ("cpu", CountingAgent()),
    ("cpu", sampling.RandomAgent(Box(-1, 1, (2,), np.float32))),
    ("gpu", NumpyLinearAgent()), ("serial", NumpyLinearAgent())])
def test_no_warning_where_nothing_would_be_frozen(kind, agent):
    env_fn = CountingEnv if isinstance(agent, CountingAgent) else sampling.CartPole
    if isinstance(agent, sampling.RandomAgent):
        env_fn = BoxActionEnv
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sampling.make_sampler(kind, env_fn, agent, batch_T=4, batch_B=2, n_workers=2):
            pass


@pytest.mark.start_method_matters  # parameter mirroring into workers that were not forked
def test_shared_arrays_agent_updates_reach_cpu_workers():
    agent = SharedLinearAgent()
    with sampling.make_sampler("cpu", sampling.CartPole, agent, batch_T=8, batch_B=4,
                               n_workers=2, start_method=ALL_METHODS[-1]) as s:
        assert (s.obtain_samples()["action"] == 0).all()
        agent.w[:] = [0, 0, 0, 0]
        agent.w[0] = -1e9  # obs @ w > 0 wherever the cart is left of centre
        b = s.obtain_samples()
        np.testing.assert_array_equal(b["action"], b["observation"][..., 0] < 0)


# -- values that would be coerced --------------------------------------------------------
class BadStepEnv(CountingEnv):
    """CountingEnv whose env ``bad_env`` returns ``value`` as ``field`` from step ``at`` on."""

    FIELDS = {"reward": 1, "terminated": 2, "truncated": 3}

    def __init__(self, field="reward", value=None, bad_env=1, at=2, **kw):
        super().__init__(**kw)
        self.field, self.value, self.bad_env, self.at = field, value, bad_env, at

    def step(self, action):
        out = list(super().step(action))
        if self.env_id == self.bad_env and self.t >= self.at:
            if self.field in self.FIELDS:
                out[self.FIELDS[self.field]] = self.value
            elif self.value is _MISSING:
                del out[4][self.field]
            else:
                out[4][self.field] = self.value
        return tuple(out)


_MISSING = "<missing>"


def _bad(field, value):
    return lambda: BadStepEnv(field=field, value=value, lengths=(50,))


@pytest.mark.parametrize("kind", one_per("driver"))
@pytest.mark.parametrize("field,value,match", [
    ("reward", None, r"env 1 \(.*\) returned reward None \(NoneType\) at step 1 of the batch"),
    ("reward", "2.5", r"env 1 .*reward '2.5' \(str\).*must be a real number"),
    ("reward", True, r"env 1 .*reward True \(bool\)"),
    ("reward", np.zeros(1), r"env 1 .*reward array\(\[0.\]\)"),
    ("terminated", "False", r"env 1 .*terminated='False' \(str\).*must be bools"),
    ("terminated", None, r"env 1 .*terminated=None"),
    ("truncated", 0, r"env 1 .*truncated=0 \(int\).*return bool\(truncated\)"),
    ("t", 0.7, r"env 1 .*env_info\['t'\]=0.7 at step 1 of the batch: dtype float64.*"
               r"expected int64"),
    ("t", "3", r"env 1 .*env_info\['t'\]='3' at step 1 of the batch"),
    ("t", 2**70, r"env 1 .*env_info\['t'\]=.*beyond int64"),
    ("score", np.zeros(2), r"env 1 .*env_info\['score'\]=.*shape \(2,\)"),
    ("t", _MISSING, r"env 1 .*returned no env_info\['t'\] at step 1 of the batch.*cannot "
                    r"tell a missing"),
])
def test_wrong_types_from_an_env_are_refused_with_env_field_and_step(kind, field, value,
                                                                     match):
    with sampling.make_sampler(kind, _bad(field, value), CountingAgent(), batch_T=5,
                               batch_B=2, n_workers=2, start_method="fork") as s:
        with pytest.raises((TypeError, ValueError, sampling.WorkerError), match=match):
            s.obtain_samples()


class NoneAfterResetEnv(CountingEnv):
    """Its resets after the first return None as the observation."""

    def reset(self, *, seed=None, options=None):
        o, info = super().reset(seed=seed, options=options)
        return (None if len(self.seeds) > 1 else o), info


@pytest.mark.parametrize("kind", one_per("driver"))
def test_a_reset_returning_none_mid_batch_is_refused(kind):
    # (it was written as zeros once, as if the env were waiting for the next batch). Env 0's
    # first episode ends at step 2, env 1's at step 4: with two workers either may report.
    with sampling.make_sampler(kind, NoneAfterResetEnv, CountingAgent(), batch_T=8,
                               batch_B=2, n_workers=2, start_method="fork") as s:
        with pytest.raises((ValueError, sampling.WorkerError),
                           match=r"env [01] .*returned observation with shape \(\) dtype "
                                 r"object at step [24] of the batch, expected shape \(4,\) "
                                 r"dtype float32"):
            s.obtain_samples()


class NumpyTypesEnv(CountingEnv):
    """Returns numpy scalars and 0-d arrays where CountingEnv returns Python ones."""

    def step(self, action):
        o, r, te, tr, info = super().step(action)
        return o, np.array(np.float32(r)), np.bool_(te), np.array(tr), info


@pytest.mark.parametrize("kind", one_per("workers"))
def test_numpy_scalars_and_0d_arrays_are_accepted_exactly(kind):
    kw = dict(batch_T=12, batch_B=2, n_workers=2, start_method="fork")
    with sampling.make_sampler(kind, CountingEnv, CountingAgent(), **kw) as s:
        want = snapshot(s.obtain_samples())
    with sampling.make_sampler(kind, NumpyTypesEnv, CountingAgent(), **kw) as s:
        got = snapshot(s.obtain_samples())
    assert_batches_equal(want, got)


def test_rewards_are_float32_whatever_the_env_returns():
    with sampling.make_sampler("serial", CountingEnv, CountingAgent(), batch_T=3,
                               batch_B=1) as s:
        assert s.obtain_samples().reward.dtype == np.float32


# -- actions and agent_info: one casting rule --------------------------------------------
class BoxActionEnv:
    """Obs float32[1]; action_space ``space``; refuses an action the space does not contain
    (so what the sampler sends is checked where the env sees it)."""

    def __init__(self, space=None):
        self.action_space = space if space is not None else Box(-1, 1, (2,), np.float32)
        self.observation_space = Box(-np.inf, np.inf, (1,), np.float32)
        self.seen = []

    def reset(self, *, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        contains = getattr(self.action_space, "contains", None)
        if contains is not None and not contains(action):
            raise ValueError(f"action {action!r} not in {self.action_space}")
        return np.ones(1, np.float32), 0.0, False, False, {}


class ConstantAgent:
    def __init__(self, value, dtype):
        self.value, self.dtype = value, dtype

    def step(self, observation, prev_action, prev_reward):
        return np.full((len(observation),) + np.shape(self.value), self.value, self.dtype), None


def _int_box(dtype):
    return lambda: BoxActionEnv(Box(np.iinfo(dtype).min, np.iinfo(dtype).max, (2,), dtype))


@pytest.mark.parametrize("kind", one_per("driver"))
@pytest.mark.parametrize("dtype,value,match", [
    (np.int8, [300, 0], r"values 0..300 outside the range of int8"),
    (np.uint8, [300, 0], r"values 0..300 outside the range of uint8"),
    (np.uint8, [-1, 0], r"values -1..0 outside the range of uint8"),
    (np.int16, [0.5, 0.0], r"dtype float64, which cannot be stored as int16"),
])
def test_out_of_range_or_lossy_actions_are_refused_alike(kind, dtype, value, match):
    agent = ConstantAgent(value, np.int64 if isinstance(value[0], int) else np.float64)
    with pytest.raises((TypeError, sampling.WorkerError), match=match):
        with sampling.make_sampler(kind, _int_box(dtype), agent, batch_T=3, batch_B=2,
                                   n_workers=2, start_method="fork") as s:
            s.obtain_samples()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_in_range_int64_actions_are_stored_in_the_action_dtype(dtype):
    with sampling.make_sampler("cpu", _int_box(dtype), ConstantAgent([5, 7], np.int64),
                               batch_T=3, batch_B=2, n_workers=2, start_method="fork") as s:
        a = s.obtain_samples()["action"]
    assert a.dtype == dtype and (a == [5, 7]).all()


class GrowingTagAgent:
    """agent_info["tag"] is a string that grows after the first call."""

    def __init__(self):
        self.calls = 0

    def step(self, observation, prev_action, prev_reward):
        self.calls += 1
        tag = "ab" if self.calls == 1 else "abcdef"
        return np.zeros(len(observation), np.int64), {"tag": np.array([tag] * len(observation))}


def test_agent_info_strings_longer_than_at_the_probe_are_refused():
    with sampling.make_sampler("serial", CountingEnv, GrowingTagAgent(), batch_T=3,
                               batch_B=2) as s:
        with pytest.raises(TypeError, match=r"agent_info\['tag'\].*longer than 2 characters"):
            s.obtain_samples()


# -- every gymnasium action space --------------------------------------------------------
def _gym_spaces() -> list:
    spaces = pytest.importorskip("gymnasium").spaces
    out = [spaces.Discrete(3), spaces.Discrete(4, start=-2), spaces.MultiDiscrete([2, 5]),
           spaces.MultiDiscrete([3, 2], start=[1, -1]), spaces.MultiBinary(3),
           spaces.MultiBinary((2, 2))]
    for dt in (np.int8, np.uint8, np.int16, np.int32, np.int64):
        out.append(spaces.Box(-3 if np.dtype(dt).kind == "i" else 0, 5, (2,), dt))
    for dt in (np.float16, np.float32, np.float64):
        out.append(spaces.Box(-1.0, 1.0, (3,), dt))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_gymnasium_action_space_in_every_kind(kind):
    for space in _gym_spaces():
        agent = sampling.RandomAgent(space, seed=1)
        with sampling.make_sampler(kind, lambda space=space: BoxActionEnv(space), agent,
                                   batch_T=6, batch_B=2, n_workers=2, start_method="fork",
                                   max_decorrelation_steps=3) as s:
            a = s.obtain_samples()["action"]
            assert s.action_space is not None
        assert a.shape == (6, 2) + space.shape and a.dtype == space.dtype, space
        for row in a.reshape((-1,) + space.shape):
            assert space.contains(row if space.shape else row.item()), (space, row)


# -- observations: tuples stay tuples, what cannot be batched is refused ------------------
class TupleObsEnv(CountingEnv):
    """Observation (float32[4], int64[2]) with integers beyond float64's exact range."""

    BIG = 2**60 + 1

    def _obs(self, action=0):
        v = super()._obs(action)
        return v, np.array([self.BIG + int(v[2]), -self.BIG], np.int64)


@pytest.mark.parametrize("kind", PARALLEL)
def test_tuple_observations_keep_each_dtype_and_match_serial(kind):
    def agent(observation):
        assert isinstance(observation, tuple) and observation[1].dtype == np.int64
        return counting_policy(observation[0])
    kw = dict(batch_T=7, batch_B=4, n_workers=2, start_method="fork", final_observation=True)
    with sampling.make_sampler("serial", TupleObsEnv, agent, **kw) as s:
        want = [snapshot(b) for b in s.steps(2)]
        assert isinstance(s.observation_space, Box)
    obs = want[0]["observation"]
    assert isinstance(obs, tuple) and obs[0].dtype == np.float32 and obs[1].dtype == np.int64
    assert (obs[1][..., 0] - TupleObsEnv.BIG == obs[0][..., 2]).all()
    with sampling.make_sampler(kind, TupleObsEnv, agent, **kw) as s:
        for a, b in zip(want, s.steps(2)):
            assert_batches_equal(a, snapshot(b))


Graph = collections.namedtuple("Graph", "nodes edges edge_links")


class GraphObsEnv(CountingEnv):
    def _obs(self, action=0):
        return Graph(np.zeros((self.t + 1, 2), np.float32), None, None)


class NoneObsEnv(CountingEnv):
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return None, {}


# -- envs that do not follow the gymnasium API -------------------------------------------
class ObsOnlyResetEnv(CountingEnv):
    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed)[0]


class OldGymStepEnv(CountingEnv):
    def step(self, action):
        o, r, te, tr, info = super().step(action)
        return o, r, te or tr, info


class ListInfoEnv(CountingEnv):
    def step(self, action):
        return super().step(action)[:4] + ([],)


class HugeInfoEnv(CountingEnv):
    def step(self, action):
        out = super().step(action)
        out[4]["big"] = 2**70
        return out


@pytest.mark.parametrize("kind", one_per("workers"))
@pytest.mark.parametrize("env_fn,error,match", [
    (lambda: None, TypeError, r"env_fn\(\) returned NoneType for the probe env.*"
                              r"gymnasium-API env"),
    (ObsOnlyResetEnv, TypeError, r"env.reset\(\) returned a ndarray; the gymnasium API "
                                 r"returns \(observation, info\)"),
    (OldGymStepEnv, TypeError, r"env.step\(\) returned a tuple of 4 .*old gym"),
    (ListInfoEnv, TypeError, r"info of type list; the gymnasium API's info is a dict"),
    (HugeInfoEnv, OverflowError, r"info\['big'\]=1180591620717411303424, beyond int64"),
    (GraphObsEnv, TypeError, r"observation\[1\] is object.*Variable-size spaces \(Sequence, "
                             r"Graph, Text\)"),
    (NoneObsEnv, TypeError, r"observation is object \(array\(None"),
])
def test_envs_off_the_gymnasium_api_get_errors_naming_the_api(kind, env_fn, error, match):
    with pytest.raises(error, match=match):
        sampling.make_sampler(kind, env_fn, CountingAgent(), batch_T=3, batch_B=2,
                              n_workers=2)


@pytest.mark.parametrize("kind", one_per("workers"))
def test_sampler_exposes_the_probe_envs_spaces(kind):
    with sampling.make_sampler(kind, CountingEnv, CountingAgent(), batch_T=3, batch_B=2,
                               n_workers=2) as s:
        assert isinstance(s.observation_space, Box) and s.observation_space.shape == (4,)
        assert isinstance(s.action_space, Discrete) and s.action_space.n == 3


class ClippingAgent:
    """Holds the env's action space (float bounds) and an env: neither is a parameter."""

    def __init__(self):
        self.action_space = Box(-1, 1, (2,), np.float32)
        self.env = BoxActionEnv()

    def step(self, observation, prev_action, prev_reward):
        n = len(observation)
        return np.clip(np.ones((n, 2), np.float32), self.action_space.low,
                       self.action_space.high), None


def test_spaces_and_envs_the_agent_holds_are_not_taken_for_parameters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sampling.make_sampler("cpu", BoxActionEnv, ClippingAgent(), batch_T=2,
                                   batch_B=2, n_workers=2):
            pass


class RewardEnv(CountingEnv):
    """CountingEnv whose env 1 returns ``value`` as its reward at its 3rd step."""

    def __init__(self, value=1.0, **kw):
        super().__init__(**kw)
        self.value, self.n_steps = value, 0

    def step(self, action):
        o, r, te, tr, info = super().step(action)
        self.n_steps += 1
        return o, (self.value if self.env_id == 1 and self.n_steps == 3 else r), te, tr, info


@pytest.mark.parametrize("value", [1e40, float("nan"), float("inf"), np.float64(-np.inf)])
@pytest.mark.parametrize("kind", ["serial", "cpu", "gpu"])
def test_rewards_that_are_not_finite_float32_are_refused(kind, value):
    import functools
    extra = {} if kind == "serial" else dict(n_workers=2, start_method="fork")
    with sampling.make_sampler(kind, functools.partial(RewardEnv, value), CountingAgent(),
                               batch_T=5, batch_B=2, **extra) as s:
        error = ValueError if kind == "serial" else sampling.WorkerError
        with pytest.raises(error, match=r"env 1 \((serial sampler|worker 1)\) returned a reward "
                                        r"at step 2 of the batch that is stored as -?(inf|nan) "
                                        r"in float32"):
            s.obtain_samples()


def test_vector_env_rewards_that_are_not_finite_are_refused():
    import functools

    from tests.helpers import vectorized
    env_fn = vectorized(functools.partial(RewardEnv, float("nan")), 2)
    with sampling.make_sampler("serial", env_fn, CountingAgent(), batch_T=5, batch_B=2) as s:
        with pytest.raises(ValueError, match=r"env 1 \(serial sampler\) returned a reward at "
                                             r"step 2 of the batch that is stored as nan"):
            s.obtain_samples()
