# CleanRL's PPO (cleanrl/ppo.py) ported to sampling.make_sampler by the steps of
# docs/porting-from-cleanrl.md: the sampler fills the [T, B] storage (num_steps x num_envs)
# that CleanRL's rollout loop fills, in worker processes, and the update is CleanRL's.
#
#     python docs/examples/cleanrl_ppo.py --total-timesteps 50000              # the cpu kind
#     python docs/examples/cleanrl_ppo.py --kind serial                        # any kind
#     python docs/examples/cleanrl_ppo.py --bootstrap-truncated                # correct, not CleanRL's
#
# Follows https://github.com/vwxyzjn/cleanrl/blob/master/cleanrl/ppo.py (docs and results:
# https://docs.cleanrl.dev/rl-algorithms/ppo/#ppopy) with its hyperparameters; plain argparse
# instead of tyro, tensorboard only if installed, wandb only with --track, and
# --total-timesteps 100,000 by default (CleanRL: 500,000). Each "PORT:" comment marks a change
# the guide explains.
#
# CleanRL's license (MIT):
# Copyright (c) 2019 CleanRL developers
#
# Permission is hereby granted, free of charge, to any person obtaining a copy of this software
# and associated documentation files (the "Software"), to deal in the Software without
# restriction, including without limitation the rights to use, copy, modify, merge, publish,
# distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
# Software is furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all copies or
# substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
# BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
# NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
# DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
# CleanRL's style is kept so that the file reads side by side with the original:
# ruff: noqa: E501, B007, B008, UP031
import argparse
import os
import random
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from torch.distributions.categorical import Categorical

import sampling
from sampling.torch_agent import to_torch


def strtobool(x):
    return str(x).lower() in ("1", "true", "yes", "y", "t", "on")


def parse_args():
    # fmt: off
    parser = argparse.ArgumentParser()
    flag = dict(type=strtobool, nargs="?", const=True)
    parser.add_argument("--exp-name", type=str, default=os.path.basename(__file__)[: -len(".py")])
    parser.add_argument("--seed", type=int, default=1, help="seed of the experiment")
    parser.add_argument("--torch-deterministic", default=True, **flag)
    parser.add_argument("--cuda", default=True, **flag, help="use CUDA if it is available")
    parser.add_argument("--track", default=False, **flag, help="track with Weights and Biases")
    parser.add_argument("--wandb-project-name", type=str, default="cleanRL")
    parser.add_argument("--wandb-entity", type=str, default=None)
    # Algorithm specific arguments
    parser.add_argument("--env-id", type=str, default="CartPole-v1")
    parser.add_argument("--total-timesteps", type=int, default=100_000)
    parser.add_argument("--learning-rate", type=float, default=2.5e-4)
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=128)
    parser.add_argument("--anneal-lr", default=True, **flag)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--gae-lambda", type=float, default=0.95)
    parser.add_argument("--num-minibatches", type=int, default=4)
    parser.add_argument("--update-epochs", type=int, default=4)
    parser.add_argument("--norm-adv", default=True, **flag)
    parser.add_argument("--clip-coef", type=float, default=0.2)
    parser.add_argument("--clip-vloss", default=True, **flag)
    parser.add_argument("--ent-coef", type=float, default=0.01)
    parser.add_argument("--vf-coef", type=float, default=0.5)
    parser.add_argument("--max-grad-norm", type=float, default=0.5)
    parser.add_argument("--target-kl", type=float, default=None)
    # PORT: the sampler's options
    parser.add_argument("--kind", type=str, default=None, choices=sorted(sampling.KINDS),
        help="sampler kind (default: cpu on CPU, gpu when the model is on CUDA)")
    parser.add_argument("--num-workers", type=int, default=None,
        help="worker processes (default: min(num_envs, usable CPUs))")
    parser.add_argument("--bootstrap-truncated", default=False, **flag,
        help="bootstrap truncated episodes from their final observation (correct); the "
             "default treats truncation as termination, as CleanRL does")
    args = parser.parse_args()
    # fmt: on
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    return args


class NoWriter:
    """Where tensorboard is not installed: the SummaryWriter calls do nothing."""

    def add_text(self, *args, **kwargs):
        pass

    def add_scalar(self, *args, **kwargs):
        pass

    def close(self):
        pass


def summary_writer(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return NoWriter()
    return SummaryWriter(log_dir)


# PORT: one env_fn for all envs (the sampler seeds env b with seed + b); RecordEpisodeStatistics
# is not needed: batch.traj_infos has every finished episode's Return and Length.
def make_env(env_id):
    def thunk():
        return gym.make(env_id)

    return thunk


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    # PORT: sized from the spaces (sampling.env_spaces), not from an envs object.
    def __init__(self, observation_space, action_space):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(np.array(observation_space.shape).prod(), 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(np.array(observation_space.shape).prod(), 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, action_space.n), std=0.01),
        )

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        logits = self.actor(x)
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


class SamplerAgent:
    """PORT: CleanRL's Agent has get_action_and_value and no forward. This adapter is the
    sampler's agent protocol around it: step() on the observations of n envs returns n
    actions and what the update needs later (agent_info), value() fills bootstrap_value.
    In the cpu kind each worker runs a copy, and the Agent's parameters are copied into
    every copy before each batch (the sampler finds the nn.Module in the attribute)."""

    def __init__(self, agent, device):
        self.agent, self.device = agent, device

    @torch.no_grad()
    def step(self, observation, prev_action, prev_reward):
        x = torch.as_tensor(observation, device=self.device)
        action, logprob, _, value = self.agent.get_action_and_value(x)
        info = {"logprob": logprob, "value": value.flatten()}
        return action.cpu().numpy(), {k: v.cpu().numpy() for k, v in info.items()}

    @torch.no_grad()
    def value(self, observation, prev_action, prev_reward):
        x = torch.as_tensor(observation, device=self.device)
        return self.agent.get_value(x).flatten().cpu().numpy()


if __name__ == "__main__":  # needed: the workers of spawn and forkserver import this file
    args = parse_args()
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = summary_writer(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # PORT: the cpu kind runs copies of the agent in CPU worker processes; a model on the GPU
    # needs a kind whose agent runs in this process (gpu, alternating).
    kind = args.kind or ("gpu" if device.type == "cuda" else "cpu")
    if device.type == "cuda" and kind == "cpu":
        raise SystemExit("--kind cpu runs the agent in CPU workers: use --kind gpu or "
                         "alternating with CUDA, or --cuda False")

    # env setup. PORT: a sampler instead of SyncVectorEnv; it fills the storage below.
    env_fn = make_env(args.env_id)
    observation_space, action_space = sampling.env_spaces(env_fn)
    assert isinstance(action_space, gym.spaces.Discrete), "only discrete action space is supported"

    agent = Agent(observation_space, action_space).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # ALGO Logic: Storage setup. PORT: the sampler's batch is the storage: [num_steps, num_envs]
    # arrays of observation, action, reward, done, agent_info["logprob"], agent_info["value"].
    sampler = sampling.make_sampler(
        kind, env_fn, SamplerAgent(agent, device),
        batch_T=args.num_steps, batch_B=args.num_envs, n_workers=args.num_workers,
        seed=args.seed, bootstrap_value=True, final_observation=args.bootstrap_truncated,
    )

    # TRY NOT TO MODIFY: start the game
    global_step = 0
    start_time = time.time()

    with sampler:
        for iteration, batch in enumerate(sampler.steps(args.num_iterations), start=1):
            # Annealing the rate if instructed to do so.
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                lrnow = frac * args.learning_rate
                optimizer.param_groups[0]["lr"] = lrnow

            # PORT: global_step counts every env step of every batch so far (x world_size
            # with ranks); the episodes that ended in this batch are in batch.traj_infos.
            global_step = iteration * args.num_steps * args.num_envs
            for traj in batch.traj_infos:
                print(f"global_step={global_step}, episodic_return={traj.Return}")
                writer.add_scalar("charts/episodic_return", traj.Return, global_step)
                writer.add_scalar("charts/episodic_length", traj.Length, global_step)

            b = to_torch(batch, device)  # zero-copy on CPU; valid until the next batch
            obs, actions, rewards = b.observation, b.action, b.reward
            logprobs, values = b.agent_info["logprob"], b.agent_info["value"]
            dones = b.done.float()

            # bootstrap value if not done
            with torch.no_grad():
                next_value = b.bootstrap_value  # the value of the observation after the batch
                if args.bootstrap_truncated:
                    final_values = agent.get_value(b.final_observation).squeeze(-1)
                advantages = torch.zeros_like(rewards).to(device)
                lastgaelam = 0
                for t in reversed(range(args.num_steps)):
                    # PORT: done[t] means step t ended the episode, so CleanRL's
                    # `1 - dones[t + 1]` (its dones[t] means obs[t] starts one) is `1 - dones[t]`.
                    nextnonterminal = 1.0 - dones[t]
                    nextvalues = next_value if t == args.num_steps - 1 else values[t + 1]
                    if args.bootstrap_truncated:  # a truncated episode goes on: V(final obs)
                        nextvalues = torch.where(b.truncated[t], final_values[t], nextvalues)
                        delta = rewards[t] + args.gamma * nextvalues * (1.0 - b.terminated[t].float()) - values[t]
                    else:  # CleanRL: truncation is treated as termination
                        delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                    advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
                returns = advantages + values

            # flatten the batch
            b_obs = obs.reshape((-1,) + observation_space.shape)
            b_logprobs = logprobs.reshape(-1)
            b_actions = actions.reshape((-1,) + action_space.shape)
            b_advantages = advantages.reshape(-1)
            b_returns = returns.reshape(-1)
            b_values = values.reshape(-1)

            # Optimizing the policy and value network
            b_inds = np.arange(args.batch_size)
            clipfracs = []
            for epoch in range(args.update_epochs):
                np.random.shuffle(b_inds)
                for start in range(0, args.batch_size, args.minibatch_size):
                    end = start + args.minibatch_size
                    mb_inds = b_inds[start:end]

                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions.long()[mb_inds])
                    logratio = newlogprob - b_logprobs[mb_inds]
                    ratio = logratio.exp()

                    with torch.no_grad():
                        # calculate approx_kl http://joschu.net/blog/kl-approx.html
                        old_approx_kl = (-logratio).mean()
                        approx_kl = ((ratio - 1) - logratio).mean()
                        clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                    mb_advantages = b_advantages[mb_inds]
                    if args.norm_adv:
                        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                    # Policy loss
                    pg_loss1 = -mb_advantages * ratio
                    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                    # Value loss
                    newvalue = newvalue.view(-1)
                    if args.clip_vloss:
                        v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                        v_clipped = b_values[mb_inds] + torch.clamp(
                            newvalue - b_values[mb_inds],
                            -args.clip_coef,
                            args.clip_coef,
                        )
                        v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                        v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
                        v_loss = 0.5 * v_loss_max.mean()
                    else:
                        v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                    entropy_loss = entropy.mean()
                    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                    optimizer.step()  # PORT: in place, so the workers' copies get it

                if args.target_kl is not None and approx_kl > args.target_kl:
                    break

            y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

            # TRY NOT TO MODIFY: record rewards for plotting purposes
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
            writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
            writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
            writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
            writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
            writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
            writer.add_scalar("losses/explained_variance", explained_var, global_step)
            print("SPS:", int(global_step / (time.time() - start_time)))
            writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

    writer.close()
