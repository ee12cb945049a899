"""Data-parallel PPO: the PPO of ppo.py (same folder) on several ranks, one sampler per rank,
gradients averaged by DistributedDataParallel. See docs/many-machines.md.

    torchrun --standalone --nproc-per-node 2 docs/examples/train_ddp.py
    torchrun --standalone --nproc-per-node 2 docs/examples/train_ddp.py --iterations 15

Under Slurm (one rank per task):

    export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_PORT=29500
    srun --nodes 2 --ntasks-per-node 2 --cpus-per-task 8 python docs/examples/train_ddp.py

Run without a launcher, it is one rank of one (an in-memory process group).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from ppo import ActorCritic, advantages, ppo_update  # ppo.py, beside this file
from torch.nn.parallel import DistributedDataParallel

import sampling
import sampling.distributed as sd
from sampling.torch_agent import TorchAgent, to_torch

ITERATIONS = 40  # batches of 128 steps x 4 envs per rank


def train(iterations=ITERATIONS, seed=0, kind="cpu", envs_per_rank=4, env_fn=sampling.CartPole):
    me = sd.init("gloo")  # rank, world size and local place, from torchrun, srun or mpirun
    torch.manual_seed(seed)
    observation_space, action_space = sampling.env_spaces(env_fn)
    model = ActorCritic(observation_space.shape[0], action_space.n)
    sd.broadcast_parameters(model)  # every rank starts from rank 0's weights
    ddp = DistributedDataParallel(model)  # averages gradients over the ranks
    agent = TorchAgent(model, seed=seed)  # seeds its sampling from the global env ids
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-3)
    n_workers = min(envs_per_rank, len(me.cpus()))  # this rank's share of the node
    curve = []
    with sampling.make_sampler(kind, env_fn, agent, batch_T=128, batch_B=envs_per_rank,
                               seed=seed, n_workers=n_workers,
                               cpu_affinity=me.cpu_affinity(n_workers),
                               bootstrap_value=True, final_observation=True,
                               **me.sampler_kwargs()) as sampler:
        for itr, batch in enumerate(sampler.steps(iterations)):
            b = to_torch(batch)
            adv, ret = advantages(b, model)
            # Every rank runs the same number of minibatches: DDP all-reduces the gradients
            # in each backward(), through the ddp module's forward.
            ppo_update(ddp, agent, opt, b, adv, ret, minibatch=128)
            stats = sd.mean_stats(batch.traj_infos)  # over every rank's episodes
            curve.append(stats["Return"])
            if me.rank == 0:
                print(f"iteration {itr:3d}  mean return {stats['Return']:6.1f} "
                      f"({stats['episodes']} episodes on {me.world_size} ranks)", flush=True)
    dist.destroy_process_group()
    return curve


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--kind", default="cpu", choices=sorted(sampling.KINDS))
    parser.add_argument("--curve", default=None, help="rank 0 writes the curve here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    curve = train(args.iterations, kind=args.kind)
    if args.curve and sd.launch().rank == 0:
        with open(args.curve, "w") as f:
            json.dump(curve, f)
