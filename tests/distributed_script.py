"""One rank of test_distributed.py's torchrun job: ``torchrun --standalone --nproc-per-node 2
tests/distributed_script.py OUT``. Every rank samples its share with ``cpu`` and ``gpu``,
gathers episodes and evaluations with sampling.distributed, and rank 0 pickles what the
test compares with one sampler to ``OUT/result.pkl``.
"""
from __future__ import annotations

import functools
import os
import pickle
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

import sampling
import sampling.distributed as sd
from tests.test_ranks import N_BATCHES, EnvRecordingEnv, run

B = 4  # envs per rank


def main(out: str) -> None:
    me = sd.init("gloo", timeout_s=120)
    assert (me.rank, me.world_size, me.launcher) == (dist.get_rank(), 2, "torchrun"), me
    result = {"launch": me}

    # The process group is checked: a forgotten rank warns, a wrong one is refused.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampling.make_sampler("serial", sampling.CartPole, lambda o: o[:, 0] > 0, batch_T=2,
                              batch_B=2).shutdown()
    result["warned"] = [str(w.message) for w in caught]
    try:
        sampling.make_sampler("serial", sampling.CartPole, lambda o: o[:, 0] > 0, batch_T=2,
                              batch_B=2, rank=1 - me.rank, world_size=2)
        result["refused"] = None
    except ValueError as e:
        result["refused"] = str(e)

    # Rank 0's parameters reach every rank.
    torch.manual_seed(me.rank)
    model = nn.Linear(3, 2)
    sd.broadcast_parameters(model)
    weights = [None, None]
    dist.all_gather_object(weights, [p.detach().clone() for p in model.parameters()])
    result["same_weights"] = all(torch.equal(a, b) for a, b in zip(*weights))

    for kind in ("cpu", "gpu"):
        batches, evaluation = run(kind, B, me.rank, me.world_size)
        snaps = [None, None]
        dist.all_gather_object(snaps, [snap for snap, _ in batches])
        episodes = [sd.gather_traj_infos(trajs) for _, trajs in batches]
        result[kind] = {
            "snapshots": snaps,  # per rank, per batch
            "episodes": [([t.stats() for t in e], e.ends) for e in episodes],
            "evaluation": ([t.stats() for t in sd.gather_traj_infos(evaluation)],
                           sd.gather_traj_infos(evaluation).ends),
            "mean": sd.mean_stats(batches[0][1]),
        }
        assert len(batches) == N_BATCHES

    # Workers do not believe they are ranks.
    folder = os.path.join(out, f"env-{me.rank}")
    os.makedirs(folder, exist_ok=True)
    with sampling.make_sampler("cpu", functools.partial(EnvRecordingEnv, folder),
                               lambda o: (o[:, 0] * 0).astype("int64"), batch_T=2, batch_B=2,
                               n_workers=2, **me.sampler_kwargs()) as s:
        s.obtain_samples()
    dist.barrier()
    if me.rank == 0:
        with open(os.path.join(out, "result.pkl"), "wb") as f:
            pickle.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
