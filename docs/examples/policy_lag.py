"""Sampling beside training: the PPO of ppo.py (same folder) with ``policy_lag=1``, so that
the workers collect batch k+1 while this process updates the model on batch k. See
docs/policy-lag.md.

    python docs/examples/policy_lag.py                 # the cpu kind, 60 batches of 128 x 8
    python docs/examples/policy_lag.py --kind gpu      # any kind but serial overlaps

Each line shows how long ``next()`` waited for the batch and how long the update took: once
the update takes as long as a collection, the wait is close to zero. At the end, the agent
is evaluated greedily on two eval envs (an evaluation needs a stopping rule:
``eval_max_steps`` and/or ``eval_max_trajectories``). Needs torch.
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch
from ppo import ActorCritic, advantages, ppo_update  # ppo.py, beside this file

import sampling
from sampling.torch_agent import TorchAgent, to_torch

ITERATIONS = 60  # batches of 128 steps x 8 envs


def train(kind="cpu", iterations=ITERATIONS, seed=0, env_fn=sampling.CartPole):
    torch.manual_seed(seed)
    observation_space, action_space = sampling.env_spaces(env_fn)
    model = ActorCritic(observation_space.shape[0], action_space.n)
    # TorchAgent records the behaviour policy's log_prob in agent_info: PPO's ratio is taken
    # against it, so a batch collected one update ago is still used correctly.
    agent = TorchAgent(model, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-3)
    recent, curve = collections.deque(maxlen=20), []
    with sampling.make_sampler(kind, env_fn, agent, batch_T=128, batch_B=8, seed=seed,
                               bootstrap_value=True, final_observation=True, policy_lag=1,
                               eval_n_envs=2, eval_max_trajectories=4,
                               eval_max_steps=2000) as sampler:
        asked = time.perf_counter()
        # Each next() returns batch k and starts collecting batch k+1 with the parameters as
        # they are now, i.e. after the update on batch k-1: exactly one update behind.
        for itr, batch in enumerate(sampler.steps(iterations)):
            waited = time.perf_counter() - asked
            b = to_torch(batch)  # zero-copy: valid until the next batch is asked for
            adv, ret = advantages(b, model)
            ppo_update(model, agent, opt, b, adv, ret)  # in place: the next snapshot sees it
            recent.extend(traj.Return for traj in batch.traj_infos)
            curve.append(float(np.mean(recent)))
            updated = time.perf_counter() - asked - waited
            print(f"iteration {itr:3d}  waited {waited * 1e3:5.1f} ms  updated "
                  f"{updated * 1e3:5.1f} ms  mean return (last 20 episodes) {curve[-1]:6.1f}",
                  flush=True)
            asked = time.perf_counter()
        # The batch in flight (steps() starts none after its last) is done by now; an
        # evaluation would otherwise let it finish first, and keep it for the next call.
        episodes = sampler.evaluate_agent(iterations)
        print(f"evaluation: {len(episodes)} episodes, mean return "
              f"{np.mean([traj.Return for traj in episodes]):.1f}", flush=True)
    return curve


if __name__ == "__main__":  # needed with the spawn and forkserver start methods
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="cpu", choices=sorted(sampling.KINDS))
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train(args.kind, args.iterations, args.seed)
