"""Torch agents: the adapter's protocol, zero-copy batches, parameter sharing with the
``cpu`` kind's workers, worker threads, recurrent state per env (the
PPO examples of docs/examples/ are run by tests/test_docs.py).
"""
from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import sampling  # noqa: E402
from sampling.spaces import Box  # noqa: E402
from sampling.torch_agent import PinnedStaging, TorchAgent, to_torch  # noqa: E402
from tests.helpers import (  # noqa: E402
    KINDS,
    METHODS,
    PARALLEL,
    RESET_MODES,
    SERVED,
    WORKER_AGENTS,
    CountingAgent,
    CountingEnv,
    DictObsEnv,
    one_per,
)

ROOT = Path(__file__).resolve().parent.parent


class ActorCritic(nn.Module):
    """Feed-forward model of the contract: obs -> (logits or mean, value)."""

    def __init__(self, obs_dim=4, n_out=3):
        super().__init__()
        self.pi = nn.Linear(obs_dim, n_out)
        self.v = nn.Linear(obs_dim, 1)

    def forward(self, obs):
        return self.pi(obs), self.v(obs)  # value [n, 1]: the agent flattens it


class StepCounter(nn.Module):
    """Recurrent: the state [1, n, 1] counts steps since the env's episode began;
    the action is that count % 3 (logits so peaked that sampling is deterministic)."""

    def forward(self, obs, state):
        if state is None:
            state = torch.zeros(1, obs.shape[0], 1)
        count = state[0, :, 0].long()
        logits = 100.0 * nn.functional.one_hot(count % 3, 3).float()
        return logits, None, state + 1


class ForgetsItsState(ActorCritic):
    def forward(self, obs, state):
        return super().forward(obs)


class LSTMPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8)
        self.pi = nn.Linear(8, 3)
        self.v = nn.Linear(8, 1)

    def forward(self, obs, state):
        out, state = self.lstm(obs[None] / 10, state)
        return self.pi(out[0]), self.v(out[0]).squeeze(-1), state


class PointEnv:
    """Continuous actions: obs = position (float32[2]); action moves it; 5-step episodes."""

    def __init__(self):
        self.observation_space = Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.x, self.t = np.zeros(2, np.float32), 0

    def reset(self, *, seed=None, options=None):
        self.x, self.t = np.zeros(2, np.float32), 0
        return self.x.copy(), {}

    def step(self, action):
        self.x = (self.x + np.asarray(action, np.float32)).astype(np.float32)
        self.t += 1
        return self.x.copy(), -float(np.abs(self.x).sum()), False, self.t >= 5, {}

    def close(self):
        pass


def _biased(bias):
    """A categorical agent over CartPole whose action is argmax(bias), whatever it sees."""
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor(bias))
    return TorchAgent(lin)


# -- import and batches ------------------------------------------------------------------
def test_importing_sampling_does_not_import_torch():
    code = "import sys, sampling; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("device", [None, "cpu"])
def test_to_torch_is_zero_copy_on_cpu(device):
    env_fn = lambda: DictObsEnv(lengths=(2, 3))  # noqa: E731
    with sampling.make_sampler("serial", env_fn, CountingAgent(), batch_T=5, batch_B=3,
                               bootstrap_value=True) as sampler:
        batch = sampler.obtain_samples()
        tensors = to_torch(batch, device)
        assert isinstance(tensors, sampling.Batch)
        assert tensors.traj_infos is batch.traj_infos
        n = 0
        for key in ("observation", "agent_info", "env_info"):
            for name in batch[key]:
                arr, ten = batch[key][name], tensors[key][name]
                if isinstance(arr, dict):
                    arr, ten = arr["k"], ten["k"]
                assert ten.data_ptr() == arr.__array_interface__["data"][0], (key, name)
                n += 1
        for key in ("action", "reward", "done", "terminated", "prev_action", "bootstrap_value"):
            assert tensors[key].data_ptr() == batch[key].__array_interface__["data"][0], key
            assert tensors[key].shape == batch[key].shape
        assert n >= 5
        assert tensors.done.dtype == torch.bool
        tensors.reward[0, 0] = -7.0  # the very same memory
        assert batch.reward[0, 0] == -7.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_torch_cuda_stages_through_reused_pinned_buffers():
    staging = PinnedStaging()
    batch = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "n": {"b": np.ones(3, bool)},
             "traj_infos": []}
    first = to_torch(batch, "cuda", staging)
    buffers = {k: v.data_ptr() for k, v in staging._buffers.items()}
    batch["a"] += 100  # the sampler overwrites its batch
    second = to_torch(batch, "cuda", staging)
    torch.cuda.synchronize()
    assert first["a"].device.type == "cuda" and first["n"]["b"].dtype == torch.bool
    assert torch.equal(first["a"].cpu(), torch.arange(12.0).reshape(3, 4))
    assert torch.equal(second["a"].cpu(), torch.arange(12.0).reshape(3, 4) + 100)
    assert {k: v.data_ptr() for k, v in staging._buffers.items()} == buffers
    assert all(v.is_pinned() for v in staging._buffers.values())


# -- the adapter ---------------------------------------------------------------------
def test_categorical_step_value_and_modes():
    torch.manual_seed(0)
    model = ActorCritic(n_out=3)
    agent = TorchAgent(model)
    obs = np.random.default_rng(0).normal(size=(500, 4)).astype(np.float32)
    zeros_a, zeros_r = np.zeros(500, np.int64), np.zeros(500, np.float32)
    action, info = agent.step(obs, zeros_a, zeros_r, env_ids=np.arange(500))
    assert action.shape == (500,) and action.dtype == np.int64
    assert sorted(info) == ["log_prob", "value"]
    with torch.no_grad():
        logits, value = model(torch.from_numpy(obs))
    expected = torch.distributions.Categorical(logits=logits).log_prob(torch.from_numpy(action))
    np.testing.assert_allclose(info["log_prob"], expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(info["value"], value[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(agent.value(obs, zeros_a, zeros_r), value[:, 0].numpy(), rtol=1e-6)
    greedy = logits.argmax(-1).numpy()
    assert (action != greedy).sum() > 50  # sampled
    agent.eval_mode(0)
    np.testing.assert_array_equal(agent.step(obs, zeros_a, zeros_r)[0], greedy)
    agent.sample_mode(1)
    assert (agent.step(obs, zeros_a, zeros_r)[0] != greedy).any()


class MeanAndLogStd(nn.Module):
    def __init__(self):
        super().__init__()
        self.mean = nn.Linear(2, 2)

    def forward(self, obs):
        return (self.mean(obs), torch.full((obs.shape[0], 2), -1.0)), None


@pytest.mark.parametrize("std_from", ["parameter", "output"])
def test_gaussian_step(std_from):
    torch.manual_seed(0)
    if std_from == "parameter":
        model = nn.Linear(2, 2)
        model.log_std = nn.Parameter(torch.full((2,), -1.0))
    else:
        model = MeanAndLogStd()
    agent = TorchAgent(model, distribution="gaussian")
    obs = np.ones((4000, 2), np.float32)
    action, info = agent.step(obs, np.zeros((4000, 2), np.float32), np.zeros(4000, np.float32))
    assert action.shape == (4000, 2) and action.dtype == np.float32
    with torch.no_grad():
        out = model(torch.from_numpy(obs))
    mean = (out[0][0] if std_from == "output" else out).numpy()
    np.testing.assert_allclose(action.std(0), np.exp(-1.0), rtol=0.1)
    np.testing.assert_allclose(action.mean(0), mean[0], atol=0.02)
    normal = torch.distributions.Normal(torch.from_numpy(mean), np.exp(-1.0))
    expected = normal.log_prob(torch.from_numpy(action)).sum(-1).numpy()
    np.testing.assert_allclose(info["log_prob"], expected, rtol=1e-4)
    agent.eval_mode(0)
    np.testing.assert_allclose(agent.step(obs[:3], action[:3], np.zeros(3))[0], mean[:3])


@pytest.mark.parametrize("kind", one_per("workers"))
def test_gaussian_agent_in_a_sampler(kind):
    model = nn.Linear(2, 2)
    model.log_std = nn.Parameter(torch.zeros(2))
    agent = TorchAgent(model, distribution="gaussian")
    with sampling.make_sampler(kind, PointEnv, agent, batch_T=5, batch_B=4, n_workers=2) as s:
        batch = s.obtain_samples()
        assert batch.action.shape == (5, 4, 2) and batch.action.dtype == np.float32
        # each observation is the sum of the episode's previous actions
        np.testing.assert_allclose(batch.observation[1:], np.cumsum(batch.action, 0)[:-1],
                                   rtol=1e-5, atol=1e-5)
        assert batch.agent_info["log_prob"].shape == (5, 4)


def test_adapter_errors():
    with pytest.raises(ValueError, match="distribution must be one of 'categorical', 'gaussian'"):
        TorchAgent(nn.Linear(4, 2), distribution="beta")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        TorchAgent(lambda obs: obs)
    obs, a, r = np.zeros((2, 4), np.float32), np.zeros(2, np.int64), np.zeros(2, np.float32)
    with pytest.raises(TypeError, match="have a log_std parameter"):
        TorchAgent(nn.Linear(4, 2), distribution="gaussian").step(obs, a, r)
    with pytest.raises(TypeError, match="the model returns no value"):
        TorchAgent(nn.Linear(4, 2)).value(obs, a, r)
    with pytest.raises(TypeError, match=r"recurrent model must return \(out, value, new_state\)"):
        TorchAgent(ForgetsItsState(), recurrent=True).step(obs, a, r)
    meta = TorchAgent(nn.Linear(4, 2), device="meta")
    with pytest.raises(ValueError, match=r"holds tensors or modules on meta: use the 'gpu' or "
                                         r"'alternating' kind"):
        sampling.make_sampler("cpu", CountingEnv, meta, batch_T=2, batch_B=2)


def test_a_worker_without_eval_envs_calls_the_agent_on_no_env():
    # eval_n_envs=1 over 2 workers: worker 1's eval slice is empty
    for agent in (TorchAgent(ActorCritic()), TorchAgent(StepCounter(), recurrent=True)):
        with sampling.make_sampler("cpu", CountingEnv, agent, batch_T=4, batch_B=2,
                                   n_workers=2, eval_n_envs=1, eval_max_steps=6) as sampler:
            sampler.obtain_samples()
            assert len(sampler.evaluate_agent()) == 1
    gaussian = nn.Linear(2, 2)
    gaussian.log_std = nn.Parameter(torch.zeros(2))
    action, info = TorchAgent(gaussian, distribution="gaussian").step(
        np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
        env_ids=np.arange(0))
    assert action.shape == (0, 2) and info["log_prob"].shape == (0,)


def test_shared_arrays_are_views_of_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    arrays = TorchAgent(model).shared_arrays()
    assert {"0.weight", "0.bias", "1.running_mean", "1.num_batches_tracked"} <= set(arrays)
    arrays["0.bias"][:] = 5.0
    arrays["1.running_mean"][:] = 2.0
    assert torch.equal(model[0].bias.detach(), torch.full((3,), 5.0))
    assert torch.equal(model[1].running_mean, torch.full((3,), 2.0))


def test_bootstrap_value_is_the_value_of_the_next_batch_first_observation():
    torch.manual_seed(0)
    agent = TorchAgent(ActorCritic(n_out=3))
    for kind in one_per("driver"):
        with sampling.make_sampler(kind, CountingEnv, agent, batch_T=4, batch_B=4,
                                   n_workers=2, bootstrap_value=True) as sampler:
            bootstrap = sampler.obtain_samples().bootstrap_value.copy()
            nxt = sampler.obtain_samples()
            np.testing.assert_allclose(bootstrap, nxt.agent_info["value"][0], rtol=1e-6)


# -- workers: threads and parameters ---------------------------------------------------
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_cpu_workers_run_torch_with_one_thread(start_method):
    class ThreadsAgent(TorchAgent):  # local: sent to spawned workers by value
        def step(self, observation, prev_action, prev_reward, env_ids=None):
            action, info = super().step(observation, prev_action, prev_reward, env_ids)
            info["threads"] = np.full(len(action), torch.get_num_threads(), np.int64)
            return action, info

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what a fork inherits
    try:
        with sampling.make_sampler("cpu", sampling.CartPole, ThreadsAgent(nn.Linear(4, 2)),
                                   batch_T=3, batch_B=2, n_workers=2,
                                   start_method=start_method) as sampler:
            threads = sampler.obtain_samples().agent_info["threads"]
            assert threads.tolist() == [[1, 1]] * 3
    finally:
        torch.set_num_threads(before)


# Worker agents get the parameters through shared memory (every start method); served kinds
# (one per group count) act in the parent, with the parameters themselves.
@pytest.mark.parametrize("kind,start_method",
                         [(k, m) for k in WORKER_AGENTS for m in METHODS]
                         + [(k, None) for k in one_per("groups", kinds=SERVED)])
def test_parent_parameter_updates_reach_every_batch(kind, start_method):
    agent = _biased([40.0, -40.0])
    bias = agent.model.bias
    with sampling.make_sampler(kind, sampling.CartPole, agent, batch_T=4, batch_B=4,
                               n_workers=2, start_method=start_method) as sampler:
        assert (sampler.obtain_samples().action == 0).all()
        for want in (1, 0, 1):
            with torch.no_grad():
                bias.neg_()  # in place, as an optimizer step does
            assert (sampler.obtain_samples().action == want).all(), want


# -- recurrent ---------------------------------------------------------------------------
@pytest.mark.parametrize("reset_mode", RESET_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_state_is_per_env_and_reset_at_episode_starts(kind, reset_mode):
    agent = TorchAgent(StepCounter(), recurrent=True)
    env_fn = lambda: CountingEnv(lengths=(3, 5, 4))  # noqa: E731
    with sampling.make_sampler(kind, env_fn, agent, batch_T=7, batch_B=4, n_workers=2,
                               reset_mode=reset_mode, eval_n_envs=2,
                               eval_max_steps=8) as sampler:
        for itr in range(3):
            batch = sampler.obtain_samples(itr)
            state = batch.agent_info["state"]
            assert state.shape == (7, 4, 1, 1)
            t_in_episode = batch.observation[..., 2]
            np.testing.assert_array_equal(state[..., 0, 0], t_in_episode)
            np.testing.assert_array_equal(batch.action, t_in_episode.astype(np.int64) % 3)
            assert sampler.evaluate_agent(itr)  # eval envs keep their own states


@pytest.mark.parametrize("kind", one_per("groups"))
def test_lstm_batch_replays_from_its_recorded_initial_state(kind):
    torch.manual_seed(0)
    model = LSTMPolicy()
    agent = TorchAgent(model, recurrent=True)
    with sampling.make_sampler(kind, CountingEnv, agent, batch_T=6, batch_B=4,
                               n_workers=2) as sampler:
        sampler.obtain_samples(0)
        batch = sampler.obtain_samples(1)  # starts mid-episode: a nonzero initial state
        b = to_torch(batch)
        assert sorted(b.agent_info["state"]) == ["0", "1"]  # LSTM (h, c)
        h, c = agent.batch_state(b.agent_info["state"], 0)
        assert h.shape == (1, 4, 8) and h.abs().sum() > 0
        state = (h, c)
        with torch.no_grad():
            for t in range(6):  # what a training loop does with a recurrent batch
                recorded = agent.batch_state(b.agent_info["state"], t)
                for mine, theirs in zip(state, recorded):
                    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
                logits, value, state = model(b.observation[t], state)
                log_prob = agent.dist(logits).log_prob(b.action[t])
                torch.testing.assert_close(log_prob, b.agent_info["log_prob"][t],
                                           rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(value, b.agent_info["value"][t], rtol=1e-5, atol=1e-6)
                keep = (~b.done[t]).float()[None, :, None]
                state = tuple(s * keep for s in state)


# -- plain agents: a torch module held by an object with none of our hooks ---------------
class PlainAgent:
    """What a port of a training script writes: the step protocol around its own module,
    no shared_arrays(); exploration from torch's global generator (Categorical.sample)."""

    def __init__(self, net):
        self.net = net

    def step(self, observation, prev_action, prev_reward):
        with torch.no_grad():
            logits = self.net(torch.as_tensor(observation))
        action = torch.distributions.Categorical(logits=logits).sample()
        return action.numpy(), {"logits": logits.numpy()}


class BiasedNet(nn.Module):
    """Logits = linear(obs) + a buffer, so parameters and buffers must both be mirrored."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("shift", torch.zeros(2))
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.copy_(torch.tensor([40.0, -40.0]))

    def forward(self, obs):
        return self.lin(obs) + self.shift


def _nested_agent():
    class Holder:
        def __init__(self):
            self.nets = {"pi": BiasedNet()}

        def step(self, observation, prev_action, prev_reward):
            return PlainAgent(self.nets["pi"]).step(observation, prev_action, prev_reward)
    h = Holder()
    return h, h.nets["pi"]


def _closure_policy():
    net = BiasedNet()

    def policy(observation):
        with torch.no_grad():
            return net(torch.as_tensor(observation)).argmax(-1).numpy()
    return policy, net


class ClassNetAgent:
    """The module is a class attribute, made at import (so in every spawned worker too)."""

    net = BiasedNet()

    def step(self, observation, prev_action, prev_reward):
        return PlainAgent(self.net).step(observation, prev_action, prev_reward)


_DEFAULT_NET = BiasedNet()


def default_arg_policy(observation, net=_DEFAULT_NET):
    """The module is a default argument (made at import)."""
    with torch.no_grad():
        return net(torch.as_tensor(observation)).argmax(-1).numpy()


def _import_time_net(net):
    with torch.no_grad():  # its state as made (another test may have changed it)
        net.lin.bias.data = torch.tensor([40.0, -40.0])
        net.shift.zero_()
    return net


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("make", ["attribute", "nested", "closure", "class_attribute",
                                  "default_arg"])
def test_plain_agent_modules_are_mirrored_into_cpu_workers(make, start_method):
    if make == "attribute":
        net = BiasedNet()
        agent = PlainAgent(net)
    elif make == "class_attribute":
        agent, net = ClassNetAgent(), _import_time_net(ClassNetAgent.net)
    elif make == "default_arg":
        agent, net = default_arg_policy, _import_time_net(_DEFAULT_NET)
    else:
        agent, net = _nested_agent() if make == "nested" else _closure_policy()
    with sampling.make_sampler("cpu", sampling.CartPole, agent, batch_T=4, batch_B=4,
                               n_workers=2, start_method=start_method) as sampler:
        assert (sampler.obtain_samples().action == 0).all()
        with torch.no_grad():
            net.lin.bias.neg_()  # in place, as an optimizer step does
        assert (sampler.obtain_samples().action == 1).all()
        with torch.no_grad():
            net.shift.copy_(torch.tensor([100.0, 0.0]))  # a buffer, e.g. running stats
        assert (sampler.obtain_samples().action == 0).all()
        net.lin.bias.data = torch.tensor([0.0, 200.0])  # .data replaced: still the parameter
        assert (sampler.obtain_samples().action == 1).all()


def test_plain_agent_explores_with_distinct_streams_per_worker():
    net = BiasedNet()
    with torch.no_grad():
        net.lin.bias.zero_()  # a uniform policy: actions are pure exploration noise
    torch.manual_seed(0)  # the parent's global stream, which fork would hand to every worker
    with sampling.make_sampler("cpu", sampling.CartPole, PlainAgent(net), batch_T=64,
                               batch_B=8, n_workers=2, start_method="fork") as sampler:
        a = sampler.obtain_samples().action
    assert not np.array_equal(a[:, :4], a[:, 4:])


class CleanRLAgent(nn.Module):
    """CleanRL ppo.py's Agent, unchanged in spirit (orthogonal init, tanh MLPs)."""

    def __init__(self):
        super().__init__()

        def layer(i, o, std=2 ** 0.5):
            lin = nn.Linear(i, o)
            nn.init.orthogonal_(lin.weight, std)
            nn.init.constant_(lin.bias, 0.0)
            return lin
        self.critic = nn.Sequential(layer(4, 64), nn.Tanh(), layer(64, 64), nn.Tanh(),
                                    layer(64, 1, 1.0))
        self.actor = nn.Sequential(layer(4, 64), nn.Tanh(), layer(64, 64), nn.Tanh(),
                                   layer(64, 2, 0.01))

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        probs = torch.distributions.Categorical(logits=self.actor(x))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


class CleanRLSamplerAgent:
    """All a port adds to CleanRL's Agent: the step protocol. No shared_arrays()."""

    def __init__(self, agent):
        self.agent = agent

    def step(self, observation, prev_action, prev_reward):
        with torch.no_grad():
            action, logprob, _, value = self.agent.get_action_and_value(
                torch.as_tensor(observation))
        return action.numpy(), {"logprob": logprob.numpy(), "value": value.flatten().numpy()}


def cleanrl_ppo(kind, iterations=40, num_envs=8, num_steps=128, seed=1):
    """CleanRL's ppo.py update (GAE, clipped surrogate, value and entropy terms), its
    rollout replaced by a sampler; returns the mean episode return per iteration."""
    torch.manual_seed(seed)
    agent = CleanRLAgent()
    optimizer = torch.optim.Adam(agent.parameters(), lr=2.5e-3, eps=1e-5)
    gamma, gae_lambda, clip, minibatches, epochs = 0.99, 0.95, 0.2, 4, 4
    curve, recent = [], collections.deque(maxlen=20)
    with sampling.make_sampler(kind, sampling.CartPole, CleanRLSamplerAgent(agent),
                               batch_T=num_steps, batch_B=num_envs, seed=seed,
                               bootstrap_value=False, n_workers=2) as sampler:
        next_obs_value = None
        for batch in sampler.steps(iterations):
            b = to_torch(batch)
            obs, actions, rewards = b.observation, b.action, b.reward
            dones, logprobs, values = b.done.float(), b.agent_info["logprob"], \
                b.agent_info["value"]
            with torch.no_grad():
                next_obs_value = agent.get_value(obs[-1]).flatten()  # CleanRL's bootstrap
                advantages, lastgaelam = torch.zeros_like(rewards), 0
                for t in reversed(range(num_steps)):
                    nextvalues = next_obs_value if t == num_steps - 1 else values[t + 1]
                    delta = rewards[t] + gamma * nextvalues * (1 - dones[t]) - values[t]
                    lastgaelam = delta + gamma * gae_lambda * (1 - dones[t]) * lastgaelam
                    advantages[t] = lastgaelam
                returns = advantages + values
            b_obs, b_act, b_logp = (x.reshape((-1,) + x.shape[2:]) for x in
                                    (obs, actions, logprobs))
            b_adv, b_ret = advantages.reshape(-1), returns.reshape(-1)
            size = num_envs * num_steps
            for _epoch in range(epochs):
                for idx in torch.randperm(size).split(size // minibatches):
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                        b_obs[idx], b_act[idx])
                    ratio = (newlogprob - b_logp[idx]).exp()
                    adv = b_adv[idx]
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                    pg_loss = torch.max(-adv * ratio,
                                        -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
                    v_loss = 0.5 * ((newvalue.view(-1) - b_ret[idx]) ** 2).mean()
                    loss = pg_loss - 0.01 * entropy.mean() + 0.5 * v_loss
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
                    optimizer.step()
            recent.extend(traj.Return for traj in batch.traj_infos)
            curve.append(float(np.mean(recent)) if recent else 0.0)
    return curve


@pytest.mark.parametrize("kind", one_per("workers"))
def test_cleanrl_ppo_port_with_a_plain_agent_learns(kind, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curve = cleanrl_ppo(kind)
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print(f"\nCleanRL port, {kind}: " + " ".join(f"{r:.0f}" for r in curve[::5]))
    assert curve[0] < 60  # random: ~20
    assert np.mean(curve[-5:]) >= 150, curve  # frozen workers stay at ~20


class OwnTorchGeneratorAgent:
    """Explores with a torch.Generator it holds, seeded with 0 in every copy."""

    def __init__(self):
        self.gen = torch.Generator().manual_seed(0)

    def step(self, observation, prev_action, prev_reward):
        return torch.randint(0, 2, (len(observation),), generator=self.gen).numpy(), None


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_torch_generator_the_agent_holds_is_reseeded_per_worker(start_method):
    def run():
        with sampling.make_sampler("cpu", sampling.CartPole, OwnTorchGeneratorAgent(),
                                   batch_T=64, batch_B=8, n_workers=2,
                                   start_method=start_method) as sampler:
            return sampler.obtain_samples().action.copy()
    a, b = run(), run()
    assert not np.array_equal(a[:, :4], a[:, 4:])
    np.testing.assert_array_equal(a, b)


class SpacesHoldingAgent(PlainAgent):
    """Keeps its spaces and has step/reset, like an env by duck typing: still walked."""

    def __init__(self, net):
        super().__init__(net)
        self.observation_space = sampling.CartPole().observation_space
        self.action_space = sampling.CartPole().action_space

    def reset(self):
        pass


def test_an_agent_holding_its_spaces_is_still_mirrored():
    net = BiasedNet()
    with sampling.make_sampler("cpu", sampling.CartPole, SpacesHoldingAgent(net), batch_T=4,
                               batch_B=4, n_workers=2, start_method="fork") as sampler:
        assert (sampler.obtain_samples().action == 0).all()
        with torch.no_grad():
            net.lin.bias.neg_()
        assert (sampler.obtain_samples().action == 1).all()


# -- policy_lag: parameters reach the copies at the snapshot point, without pickling --------
class BiasVersion(nn.Module):
    """Its bias is the version the test's "training" sets; it acts on nothing else."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.zero_()

    def forward(self, obs):
        return self.lin(obs).squeeze(-1)


class PlainVersionAgent:
    """A plain object holding a torch module, none of our hooks."""

    def __init__(self):
        self.net = BiasVersion()

    def __call__(self, observation):
        with torch.no_grad():
            v = self.net(torch.as_tensor(observation))
        return (v.round().long() % 3).numpy()


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", PARALLEL)
def test_policy_lag_mirrors_torch_parameters_of_a_plain_agent(kind, start_method, no_leaks):
    agent = PlainVersionAgent()
    with sampling.make_sampler(kind, CountingEnv, agent, batch_T=4, batch_B=4, n_workers=2,
                               policy_lag=1, start_method=start_method) as s:
        for k, batch in enumerate(s.steps(5)):
            assert (batch.action == max(k - 1, 0) % 3).all(), (k, batch.action)
            with torch.no_grad():
                agent.net.lin.bias += 1  # the update on batch k, in place


def test_policy_lag_with_a_torch_agent_in_the_action_server_copies_no_pickles(monkeypatch,
                                                                             no_leaks):
    """The server's copy is made once; each snapshot copies tensors in place."""
    import pickle
    model = ActorCritic(n_out=3)
    agent = TorchAgent(model, seed=0)
    with sampling.make_sampler("gpu", CountingEnv, agent, batch_T=4, batch_B=4, n_workers=2,
                               policy_lag=1, start_method="fork") as s:
        copy = s._collecting_runner.agent
        assert copy is not agent and copy.model is not model
        ptr = copy.model.pi.bias.data_ptr()
        calls = []
        import cloudpickle
        for mod in (pickle, cloudpickle):
            monkeypatch.setattr(mod, "dumps", lambda *a, **k: calls.append(1) or b"")
        for _ in range(3):
            s.obtain_samples()  # each call starts the next batch with a snapshot
            with torch.no_grad():
                model.pi.bias += 1.0
        assert not calls and copy.model.pi.bias.data_ptr() == ptr  # copied in place
        # the copy holds the parameters of the last snapshot: one update behind
        torch.testing.assert_close(copy.model.pi.bias, model.pi.bias - 1.0)


