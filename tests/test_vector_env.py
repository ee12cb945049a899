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
import warnings  # noqa: E402

import sampling  # noqa: E402
from tests.helpers import (  # noqa: E402
    ALL_METHODS,
    PARALLEL,
    CountingAgent,
    CountingEnv,
    DictObsEnv,
    IdTraj,
    assert_runs_equal,
    cartpole_policy,
    snapshot,
    vectorized,
    with_methods,
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
    """serial, and every parallel kind under METHODS, for each config; where METHODS is
    reduced to fork, each config also once under spawn."""
    out = []
    for config in CONFIGS:
        out.append(pytest.param("serial", None, config, id=f"serial-{config}"))
        for kind, method in with_methods(PARALLEL, key=config):
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


# -- bad input: each refused before any batch, naming the env, the field and the fix -------
VCART = sampling.envs.make_vector_cartpole
VCART4 = functools.partial(VCART, 4)


def _make(kind="serial", env_fn=VCART4, agent=cartpole_policy, **kw):
    kw = {"batch_T": 8, "batch_B": 8, **kw}
    if kind != "serial":
        kw.setdefault("n_workers", 2)
        kw.setdefault("start_method", "fork")
    return sampling.make_sampler(kind, env_fn, agent, **kw)


@pytest.mark.parametrize("kind", ["serial", "cpu"])
def test_batch_B_must_be_whole_vector_envs(kind):
    with pytest.raises(ValueError, match=r"batch_B=6 is not a multiple of num_envs=4: "
                                         r"env_fn\(\) returns vector envs.*Use batch_B=4 or 8"):
        _make(kind, batch_B=6)
    with pytest.raises(ValueError, match=r"eval_n_envs=2 is not a multiple of num_envs=4.*"
                                         r"Use eval_n_envs=4"):
        _make(kind, eval_n_envs=2, eval_max_steps=10)


def test_wait_mode_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="reset_mode='wait' cannot be honoured with vector "
                                         "envs.*steps all its sub-envs together"):
        _make(reset_mode="wait")


@pytest.mark.parametrize("mode, match", [
    ("NextStep", "autoreset mode NextStep.*transition that never happened.*AutoresetMode"
                 r"\.SAME_STEP"),
    (None, r"metadata\['autoreset_mode'\] is None: the sampler must know how it restarts"),
    ("Sometimes", r"metadata\['autoreset_mode'\] is 'Sometimes'"),
])
def test_autoreset_modes_that_cannot_be_honoured_are_refused(mode, match):
    with pytest.raises(ValueError, match="the probe env .* is a vector env .*" + match):
        _make(env_fn=vectorized(CountingEnv, 2, mode), batch_B=4)


def test_gymnasium_default_next_step_is_refused_with_the_fix():
    gym = pytest.importorskip("gymnasium")
    env_fn = functools.partial(gym.make_vec, "CartPole-v1", num_envs=2)
    with pytest.raises(ValueError, match="NextStep.*vector_kwargs"):
        _make(env_fn=env_fn, batch_B=4)


def test_separate_eval_envs_are_checked_too():
    with pytest.raises(ValueError, match="the first eval env is a vector env in autoreset mode "
                                         "NextStep"):
        _make(eval_env_fn=functools.partial(VCART, 2, autoreset_mode="NextStep"),
              eval_n_envs=2, eval_max_steps=10)


class BadVector:
    """A vector env of 2 that goes wrong in one way, from step ``at`` on."""

    def __init__(self, bad, at=0, num_envs=2):
        self.inner = VCART(2, max_episode_steps=10)
        self.num_envs = num_envs
        self.bad, self.at, self.t = bad, at, 0
        self.metadata = self.inner.metadata
        self.single_action_space = self.inner.single_action_space
        self.single_observation_space = self.inner.single_observation_space
        self.action_space = self.inner.action_space

    def reset(self, *, seed=None, options=None):
        o, info = self.inner.reset(seed=seed, options=options)
        if self.bad == "reset_obs":
            o = o[0]
        return o, info

    def step(self, actions):
        o, r, te, tr, info = self.inner.step(actions)
        self.t += 1
        if self.t > self.at:
            if self.bad == "reward_list":
                r = list(r)
            elif self.bad == "reward_shape":
                r = r[:1]
            elif self.bad == "reward_bool":
                r = r > 0
            elif self.bad == "terminated_int":
                te = te.astype(int)
            elif self.bad == "obs_dtype":
                o = o.astype(np.float64)
            elif self.bad == "obs_rows":
                o = o[:1]
            elif self.bad == "no_final_obs":
                info = {}
            elif self.bad == "four_tuple":
                return o, r, te | tr, info
        return o, r, te, tr, info


PROBE_CASES = {
    "reward_list": r"rewards list .* at the probe step; a vector env returns rewards as a "
                   r"numpy array of 2 real numbers",
    "reward_shape": r"rewards shape \(1,\) dtype float64 at the probe step",
    "reward_bool": r"rewards shape \(2,\) dtype bool",
    "terminated_int": r"terminated shape \(2,\) dtype int64 .* numpy array of 2 bools",
    "reset_obs": r"observations of shape \(4,\) from reset\(\); expected \[num_envs, \.\.\.\]",
    "four_tuple": r"returned tuple from step\(\) at the probe step; a vector env returns "
                  r"\(observations, rewards, terminated, truncated, infos\)",
}


@pytest.mark.parametrize("bad", list(PROBE_CASES))
def test_arrays_not_num_envs_long_are_refused_at_the_probe(bad):
    with pytest.raises((TypeError, ValueError), match=PROBE_CASES[bad]):
        _make(env_fn=functools.partial(BadVector, bad), batch_B=4)


def test_num_envs_must_be_a_positive_int():
    with pytest.raises(ValueError, match="looks like a vector env .* num_envs is 0"):
        _make(env_fn=functools.partial(BadVector, None, num_envs=0), batch_B=4)


MID_RUN = {
    "obs_dtype": r"envs 2\.\.3 \(one vector env, worker 1\) returned observations with shape "
                 r"\(2, 4\) dtype float64 at step 4 of the batch, expected shape \(2, 4\) "
                 r"dtype float32",
    "obs_rows": r"envs 2\.\.3 \(one vector env, worker 1\) returned observations with shape "
                r"\(1, 4\)",
    "reward_list": r"envs 2\.\.3 \(one vector env, worker 1\) returned rewards list",
    "no_final_obs": r"envs 2\.\.3 \(one vector env, worker 1\) ended the episodes of envs "
                    r"\[[23](, 3)?\] at step \d+ but its infos have no 'final_obs'",
}


@pytest.mark.parametrize("bad, start_method", [(b, "fork") for b in MID_RUN]
                         + [pytest.param("obs_dtype", m, marks=pytest.mark.start_method_matters)
                            for m in ALL_METHODS if m != "fork"])  # a closure, pickled
def test_bad_values_mid_run_name_the_vector_env_its_columns_and_the_step(bad, start_method):
    def env_fn():
        import multiprocessing as mp
        w = mp.current_process().name.endswith("worker-1")
        return BadVector(bad if w else None, at=4)

    with _make("cpu", env_fn=env_fn, batch_B=4, batch_T=16, start_method=start_method) as s:
        with pytest.raises(sampling.WorkerError, match=MID_RUN[bad]):
            s.obtain_samples()


# -- decorrelation, evaluation, auto, processes, deadlines ---------------------------------
def test_decorrelation_is_the_same_in_every_kind_and_counts_per_vector_env():
    kw = dict(max_decorrelation_steps=12, final_observation=True, traj_info=IdTraj)
    env_fn = vectorized(COUNTING, 2)
    ref, _ = _run("serial", env_fn, CountingAgent(), **kw)
    plain, _ = _run("serial", env_fn, CountingAgent(), traj_info=IdTraj, final_observation=True)
    assert ref[0]["observation"].tobytes() != plain[0]["observation"].tobytes()
    # sub-envs of one vector env took the same number of steps: obs[..., 2] is the step
    # within the episode, and CountingEnv's episodes differ per env, so the first rows show
    # k steps of decorrelation (episode resets aside) for both columns of a vector env.
    for kind in PARALLEL:
        got, _ = _run(kind, env_fn, CountingAgent(), n_workers=2, start_method="fork", **kw)
        assert_runs_equal(got, ref)


def test_decorrelation_steps_of_vector_envs_are_left_out_of_episode_stats():
    """Worked by hand from CountingEnv's rules: env e's episode i lasts L = LENGTHS[(e + i)
    % 4] steps with reward t at its step t. A column that starts the first batch at step t0
    of episode i (obs[0] = [e, i, t0, .]) ends that episode after L - t0 batch steps, with
    return t0+1 + ... + L: the t0 decorrelation steps are not counted (single envs count
    them). Both columns of a vector env took the same number of decorrelation steps."""
    lengths = (3, 5, 4, 7)
    kw = dict(max_decorrelation_steps=12, traj_info=IdTraj)
    (batches, _) = _run("serial", vectorized(COUNTING, 2), CountingAgent(), n=1, **kw)
    obs, episodes = batches[0]["observation"][0], batches[0]["traj_infos"]
    steps_taken = []
    for b in range(SIZE["batch_B"]):
        e, i, t0 = (int(x) for x in obs[b, :3])
        assert e == SIZE["seed"] + b
        steps_taken.append(sum(lengths[(e + j) % 4] for j in range(i)) + t0)
        L = lengths[(e + i) % 4]
        (ep,) = [t for t in episodes if (t["EnvId"], t["Episode"]) == (e, i)]
        assert (ep["Length"], ep["Return"], ep["StartT"]) == (L - t0, sum(range(t0 + 1, L + 1)),
                                                              t0), (b, ep)
    assert steps_taken[0] == steps_taken[1] and steps_taken[2] == steps_taken[3], steps_taken
    assert any(obs[:, 2] > 0), "no column starts mid-episode: nothing tells the rule apart"


def test_eval_envs_may_be_vector_envs_while_training_envs_are_single():
    kw = dict(eval_n_envs=4, eval_max_steps=60, traj_info=IdTraj)
    ref = _run("serial", COUNTING, CountingAgent(), eval_env_fn=COUNTING, **kw)
    for kind in ("serial", "cpu", "gpu"):
        extra = {} if kind == "serial" else dict(n_workers=2, start_method="fork")
        got = _run(kind, COUNTING, CountingAgent(), eval_env_fn=vectorized(COUNTING, 2), **kw,
                   **extra)
        assert_runs_equal(got[0], ref[0])
        assert got[1] == ref[1] and ref[1][0]


def test_auto_measures_vector_envs_and_picks_a_kind(two_usable_cpus):
    with sampling.make_sampler("auto", VCART4, cartpole_policy, batch_T=8, batch_B=16,
                               n_workers=2) as s:
        assert s.kind in sampling.KINDS
        assert s.obtain_samples().reward.shape == (8, 16)
    with sampling.make_sampler("auto", VCART4, cartpole_policy, batch_T=8, batch_B=4,
                               n_workers=2) as s:
        assert s.kind == "serial"
        assert "one vector env" in s.auto_reason


def test_auto_cost_model_counts_bookkeeping_per_vector_env():
    from sampling.auto import COLLECT_S, Measurements, predict
    a = {n: 1e-6 for n in (4, 8, 16)}
    m = dict(env_step_s=1e-6, agent_call_s=a, batch_B=16, n_workers=2,
             alternating_workers=2, usable_cpus=2)
    single, vector = predict(Measurements(**m)), predict(Measurements(**m, width=8))
    assert single["serial"] == pytest.approx(16 * (1e-6 + COLLECT_S) + 1e-6)
    assert vector["serial"] == pytest.approx(16 * (1e-6 + COLLECT_S / 8) + 1e-6)
    assert vector["cpu"] < single["cpu"]


def test_a_vector_env_with_its_own_processes_runs_in_serial_and_is_closed():
    gym = pytest.importorskip("gymnasium")
    env_fn = functools.partial(gym.make_vec, "CartPole-v1", num_envs=2,
                               vectorization_mode="async",
                               vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    import multiprocessing as mp
    with sampling.make_sampler("serial", env_fn, cartpole_policy, batch_T=8, batch_B=4) as s:
        assert s.obtain_samples().reward.shape == (8, 4)
        assert len(mp.active_children()) == 4  # two vector envs of two processes each
    assert not mp.active_children()  # no_leaks checks every process too
    # One worker: with two, the parent stops the second with SIGTERM once the first fails,
    # and one that is between its arena file's creation and unlink (AsyncVectorEnv's shared
    # memory) leaves it in /dev/shm (a known library leak: see test_leaks.py,
    # test_a_worker_stopped_while_making_a_shared_array_leaves_no_arena_file).
    with pytest.raises(sampling.WorkerError, match="starts processes of its own .* Use the "
                                                   "'serial' kind"):
        with _make("cpu", env_fn=env_fn, batch_B=4, n_workers=1) as s:
            s.obtain_samples()


class HangingVector(BadVector):
    def step(self, actions):
        import multiprocessing as mp
        import time
        if self.t >= 3 and mp.current_process().name.endswith("worker-1"):
            time.sleep(60)
        return super().step(actions)


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_a_stuck_vector_env_is_named_by_its_columns(kind):
    with _make(kind, env_fn=functools.partial(HangingVector, None), batch_B=4, batch_T=16,
               step_timeout=1.0) as s:
        with pytest.raises(sampling.WorkerError,
                           match=r"envs 2\.\.3 \(one vector env\) did not return from its "
                                 r"step at batch step 3"):
            s.obtain_samples()


def test_sampler_reports_single_spaces_and_worker_counts_in_vector_envs():
    with pytest.warns(UserWarning, match=r"n_workers=3 > the 2 vector envs \(batch_B=8 / "
                                         r"num_envs=4\): using 2 workers"):
        s = _make("cpu", n_workers=3)
    with s:
        assert s.n_workers == 2
        assert s.action_space.n == 2 and s.observation_space.shape == (4,)
    with pytest.raises(ValueError, match=r"splits the envs into two equal groups: batch_B=12 "
                                         r"over n_workers=2 .* batch_B divisible by n_workers "
                                         r"\* num_envs"):
        _make("alternating", batch_B=12, n_workers=2)


@pytest.mark.parametrize("kind", ["serial", "cpu"])
def test_same_step_infos_of_ended_episodes_come_from_final_info(kind):
    """gymnasium moves an ended sub-env's step info to infos["final_info"] (the top level
    holds its reset's, which may lack the entry): env_info at that step is the step's, as
    for single envs, also when every sub-env ends at once."""
    together = functools.partial(CountingEnv, lengths=(3,))
    kw = dict(batch_T=7, batch_B=4, seed=1, traj_info=IdTraj)
    ref, _ = _run_plain("serial", together, **kw)
    extra = {} if kind == "serial" else dict(n_workers=2, start_method="fork")
    got, _ = _run_plain(kind, vectorized(together, 2), **kw, **extra)
    assert_runs_equal(got, ref)
    assert (ref[0]["env_info"]["t"][2] == 3).all() and ref[0]["done"][2].all()


def _run_plain(kind, env_fn, **kw):
    with sampling.make_sampler(kind, env_fn, CountingAgent(), **kw) as s:
        return [snapshot(b) for b in s.steps(2)], None


class MinimalVector:
    """Exactly the README's duck type: no batched action_space or observation_space."""

    def __init__(self, n=2, list_obs=False, fail_reset_at=None):
        self.inner = VCART(n, max_episode_steps=5, autoreset_mode="Disabled")
        self.num_envs = n
        self.metadata = self.inner.metadata
        self.single_action_space = self.inner.single_action_space
        self.single_observation_space = self.inner.single_observation_space
        self.list_obs, self.fail_reset_at, self.resets = list_obs, fail_reset_at, 0

    def reset(self, *, seed=None, options=None):
        self.resets += 1
        if self.fail_reset_at is not None and self.resets >= self.fail_reset_at:
            raise RuntimeError("reset failed")
        o, info = self.inner.reset(seed=seed, options=options)
        return (list(o) if self.list_obs else o), info

    def step(self, actions):
        return self.inner.step(actions)


def test_the_readme_duck_type_is_enough():
    with _make(env_fn=MinimalVector, batch_B=4) as s:
        assert s.obtain_samples().observation.shape == (8, 4, 4)


def test_list_observations_are_refused_at_the_probe():
    with pytest.raises(TypeError, match=r"returned observations as list from reset\(\); a "
                                        r"vector env returns numpy arrays"):
        _make("cpu", env_fn=functools.partial(MinimalVector, list_obs=True), batch_B=4)


def test_a_failing_masked_reset_is_named():
    env_fn = functools.partial(MinimalVector, fail_reset_at=2)  # the probe's reset is its own
    with _make("cpu", env_fn=env_fn, batch_B=4, batch_T=16) as s:
        with pytest.raises(sampling.WorkerError,
                           match=r"reset failed \(in the masked reset \(reset\(options="
                                 r"\{'reset_mask': \.\.\.\}\)\) of envs \d\.\.\d \(one vector "
                                 r"env\) after step \d+ of the batch\)"):
            s.obtain_samples()


def test_alternating_needs_two_vector_envs():
    with pytest.raises(ValueError, match=r"'alternating' needs 2 groups of workers, each with "
                                         r"at least one env to step, and the 1 vector env "
                                         r"\(batch_B=4 / num_envs=4\) cannot make 2: use "
                                         r"batch_B >= 8"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no warning about an n_workers not given
            _make("alternating", batch_B=4, n_workers=None)


def test_auto_keeps_an_env_with_its_own_processes_in_serial(two_usable_cpus):
    gym = pytest.importorskip("gymnasium")
    env_fn = functools.partial(gym.make_vec, "CartPole-v1", num_envs=2,
                               vectorization_mode="async",
                               vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    with sampling.make_sampler("auto", env_fn, cartpole_policy, batch_T=8, batch_B=4) as s:
        assert s.kind == "serial"
        assert "starts processes of its own" in s.auto_reason
        assert s.obtain_samples().reward.shape == (8, 4)
