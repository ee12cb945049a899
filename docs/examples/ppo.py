"""PPO on CartPole with a sampler: the training loop of docs/agents.md.

    python docs/examples/ppo.py                      # the cpu kind, 60 batches of 128 x 8
    python docs/examples/ppo.py --kind gpu           # any kind: the curve is the same kind of curve
    python docs/examples/ppo.py --policy-lag 1       # collect the next batch during the update

Trains on the built-in ``sampling.CartPole`` (episodes end at 500 steps) in about ten
seconds on two cores. Needs torch (``pip install ".[torch]"``).
"""
from __future__ import annotations

import argparse
import collections

import numpy as np
import torch
from torch import nn

import sampling
from sampling.torch_agent import TorchAgent, to_torch

KIND = "cpu"  # or "serial", "gpu", "alternating", "no_overlap_alternating"
ITERATIONS = 60  # batches of 128 steps x 8 envs


class ActorCritic(nn.Module):
    def __init__(self, obs_dim, n_actions, hidden=64):
        super().__init__()
        self.pi = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_actions))
        self.v = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, obs):  # TorchAgent's model contract: obs -> (logits, value)
        return self.pi(obs), self.v(obs).squeeze(-1)


def advantages(b, model, gamma=0.99, lam=0.95):
    """GAE over a batch of tensors ``b`` (to_torch of a batch recorded with
    bootstrap_value=True and final_observation=True); returns (advantages, returns)."""
    value = b.agent_info["value"]
    with torch.no_grad():
        # The value after step t: the next row's, the bootstrap value after the last row,
        # the final observation's if the episode was truncated, and 0 if it terminated.
        next_value = torch.cat([value[1:], b.bootstrap_value[None]])
        next_value = torch.where(b.truncated, model(b.final_observation)[1], next_value)
        next_value = torch.where(b.terminated, 0.0, next_value)
        delta = b.reward + gamma * next_value - value
        adv, last = torch.zeros_like(delta), 0.0
        for t in reversed(range(len(delta))):  # done[t]: step t ended its episode
            last = delta[t] + gamma * lam * ~b.done[t] * last
            adv[t] = last
    return adv, adv + value


def ppo_update(model, agent, opt, b, adv, ret, clip=0.2, epochs=4, minibatch=256):
    """PPO's clipped objective over the batch ``b``, minibatches of ``minibatch`` steps."""
    obs, act, old_logp = (x.flatten(0, 1) for x in
                          (b.observation, b.action, b.agent_info["log_prob"]))
    adv, ret = adv.flatten(), ret.flatten()
    for _epoch in range(epochs):
        for idx in torch.randperm(len(obs)).split(minibatch):
            logits, v = model(obs[idx])
            dist = agent.dist(logits)
            ratio = (dist.log_prob(act[idx]) - old_logp[idx]).exp()
            a = (adv[idx] - adv[idx].mean()) / (adv[idx].std() + 1e-8)
            policy_loss = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
            loss = (policy_loss.mean() + 0.5 * (v - ret[idx]).pow(2).mean()
                    - 0.01 * dist.entropy().mean())
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()  # in place: the cpu kind's workers see it at the next batch


def train(kind=KIND, iterations=ITERATIONS, seed=0, policy_lag=0, env_fn=sampling.CartPole):
    # policy_lag=1: collect the next batch while this one trains (docs/policy-lag.md); PPO's
    # clipped ratio, computed against the recorded log_prob, absorbs the one update of lag.
    torch.manual_seed(seed)
    observation_space, action_space = sampling.env_spaces(env_fn)  # sizes the network
    model = ActorCritic(observation_space.shape[0], action_space.n)
    agent = TorchAgent(model, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-3)
    recent, curve = collections.deque(maxlen=20), []
    with sampling.make_sampler(kind, env_fn, agent, batch_T=128, batch_B=8, seed=seed,
                               bootstrap_value=True, final_observation=True,
                               policy_lag=policy_lag) as sampler:
        for itr, batch in enumerate(sampler.steps(iterations)):
            b = to_torch(batch)  # zero-copy tensors, valid until the next batch
            adv, ret = advantages(b, model)
            ppo_update(model, agent, opt, b, adv, ret)
            recent.extend(traj.Return for traj in batch.traj_infos)
            curve.append(float(np.mean(recent)))
            print(f"iteration {itr:3d}  mean return (last 20 episodes) {curve[-1]:6.1f}",
                  flush=True)
    return curve


if __name__ == "__main__":  # needed with the spawn and forkserver start methods
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default=KIND, choices=sorted(sampling.KINDS) + ["auto"])
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-lag", type=int, default=0, choices=(0, 1))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small model: one thread is fastest, and leaves cores to the envs
    train(args.kind, args.iterations, args.seed, args.policy_lag)
