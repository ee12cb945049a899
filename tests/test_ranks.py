"""Ranks: N samplers with ``rank=r, world_size=N`` add up, column for column, to one
sampler with N times the envs (every field, episode stats, decorrelation, evaluation), in
every kind; the launcher's variables (sampling.distributed.launch) and what workers
inherit of them; bad input. The torch.distributed side (real ranks under torchrun) is in
test_distributed.py.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import sampling
import sampling.distributed as sd
from sampling import WorkerError
from tests.helpers import (
    KINDS,
    ROOT,
    CountingEnv,
    FailingEnv,
    IdTraj,
    RecurrentCounter,
    assert_batches_equal,
    snapshot,
    vectorized,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

ENV = functools.partial(CountingEnv, lengths=(3, 5, 4, 7))
N_BATCHES = 3


class RecurrentAgent(RecurrentCounter):
    """Deterministic, with per-env state indexed by global env id (steps since
    ``reset_one``); agent_info records the ids and the state, ``value`` uses the ids."""

    def step(self, observation, prev_action, prev_reward, env_ids):
        _, info = super().step(observation, prev_action, prev_reward, env_ids)
        action = (observation[:, 0].astype(np.int64) + info["count"]) % 3
        return action, {"id": env_ids.astype(np.int64), "count": info["count"]}

    def value(self, observation, prev_action, prev_reward, env_ids):
        return (observation[:, 2] + 1000 * env_ids).astype(np.float32)


def run(kind, batch_B, rank=0, world_size=1, env_fn=ENV, eval_per_rank=2, **kw):
    """Snapshots of N_BATCHES batches (with their episodes' ends) and one evaluation."""
    opts = dict(batch_T=7, seed=5, traj_info=IdTraj, max_decorrelation_steps=4,
                final_observation=True, bootstrap_value=True, eval_n_envs=eval_per_rank,
                eval_max_steps=eval_per_rank * 9)
    opts.update(kw)
    with sampling.make_sampler(kind, env_fn, RecurrentAgent(), batch_B=batch_B, rank=rank,
                               world_size=world_size, **opts) as s:
        assert (s.rank, s.world_size) == (rank, world_size)
        assert s.env_ids.tolist() == list(range(rank * batch_B, (rank + 1) * batch_B))
        batches = []
        for b in s.steps(N_BATCHES):
            batches.append((snapshot(b), b.traj_infos))
        return batches, s.evaluate_agent()


def columns(snap: dict, lo: int, hi: int) -> dict:
    """The columns lo..hi-1 of a batch snapshot (without its episodes)."""
    def cut(k, x):
        if isinstance(x, dict):
            return {kk: cut(k, v) for kk, v in x.items()}
        return x[lo:hi] if k == "bootstrap_value" else x[:, lo:hi]
    return {k: cut(k, v) for k, v in snap.items() if k != "traj_infos"}


def assert_ranks_add_up(one, parts, batch_B):
    """Rank r's batches are one's columns r*B..; merged episodes and evaluations are one's."""
    (one_batches, one_eval), N = one, len(parts)
    for i in range(N_BATCHES):
        for r, (batches, _) in enumerate(parts):
            mine = {k: v for k, v in batches[i][0].items() if k != "traj_infos"}
            assert_batches_equal(mine, columns(one_batches[i][0], r * batch_B,
                                               (r + 1) * batch_B), f"batch {i}, rank {r}")
        merged = sd.merge_episodes([batches[i][1] for batches, _ in parts])
        assert merged.ends == one_batches[i][1].ends, f"batch {i}: episode order"
        assert [t.stats() for t in merged] == [t.stats() for t in one_batches[i][1]]
    merged = sd.merge_episodes([ev for _, ev in parts])
    assert merged.ends == one_eval.ends
    assert [t.stats() for t in merged] == [t.stats() for t in one_eval]
    assert len(one_eval) > N  # the evaluation ran episodes in every rank


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_are_one_sampler_with_twice_the_envs(kind):
    B = 4
    one = run(kind, 2 * B, eval_per_rank=4)
    parts = [run(kind, B, r, 2) for r in range(2)]
    assert_ranks_add_up(one, parts, B)
    # Seeds are global: CountingEnv's obs[0] is its seed, seed + its global index.
    assert parts[1][0][0][0]["observation"][0, :, 0].tolist() == [5 + b for b in range(B, 2 * B)]
    # Rank 1's recurrent agent saw global ids B..2B-1.
    assert parts[1][0][0][0]["agent_info"]["id"][0].tolist() == list(range(B, 2 * B))


@pytest.mark.start_method_matters  # the agent's copies and env ids, unpickled
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_ranks_add_up_under_every_start_method(method):
    one = run("cpu", 4, eval_per_rank=2, start_method=method, n_workers=2)
    parts = [run("cpu", 2, r, 2, eval_per_rank=1, start_method=method, n_workers=1)
             for r in range(2)]
    assert_ranks_add_up(one, parts, 2)


def test_three_ranks_with_vector_envs():
    env = vectorized(ENV, 2)
    one = run("cpu", 6 * 2 // 2 * 1, env_fn=env, eval_per_rank=6, n_workers=3)
    parts = [run("cpu", 2, r, 3, env_fn=env, n_workers=1) for r in range(3)]
    assert_ranks_add_up(one, parts, 2)


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_ranks_add_up_with_policy_lag(kind):
    one = run(kind, 4, eval_per_rank=2, policy_lag=1)
    parts = [run(kind, 2, r, 2, eval_per_rank=1, policy_lag=1) for r in range(2)]
    assert_ranks_add_up(one, parts, 2)


class IdsSeenAgent:
    """Records every env id it is called with (in this process: the served kinds, serial,
    the probe and auto's timing calls run it here)."""

    def __init__(self):
        self.seen: set = set()

    def step(self, observation, prev_action, prev_reward, env_ids):
        self.seen.update(int(i) for i in env_ids)
        return np.zeros(len(observation), np.int64), None


@pytest.mark.parametrize("kind", ["serial", "gpu", "auto"])
def test_the_agent_only_ever_sees_its_ranks_env_ids(kind):
    """Also in the sampler's probe call and auto's timing calls: rank 1 of 2 with 4 envs
    each holds global envs 4..7, and the agent sees exactly those."""
    agent = IdsSeenAgent()
    with sampling.make_sampler(kind, ENV, agent, batch_T=3, batch_B=4, rank=1,
                               world_size=2) as s:
        s.obtain_samples()
    assert agent.seen == {4, 5, 6, 7}


class NumpyRandomPolicy:
    """A stochastic policy on the global numpy generator, as users write one."""

    def __call__(self, observation):
        return np.random.randint(0, 3, size=len(observation))


def test_stochastic_worker_streams_follow_global_env_indices():
    """In ``cpu`` a worker's random streams derive from the seed and its first env's global
    index: 2 ranks x 2 workers draw what one sampler's 4 workers draw (and no two workers
    draw the same)."""
    kw = dict(batch_T=12, seed=3)

    def actions(B, W, rank=0, world=1):
        with sampling.make_sampler("cpu", ENV, NumpyRandomPolicy(), batch_B=B, n_workers=W,
                                   rank=rank, world_size=world, **kw) as s:
            return np.array(s.obtain_samples().action)

    one = actions(8, 4)
    parts = [actions(4, 2, r, 2) for r in range(2)]
    assert np.array_equal(np.concatenate(parts, axis=1), one)
    streams = [one[:, 2 * w:2 * w + 2].tobytes() for w in range(4)]
    assert len(set(streams)) == 4


def test_errors_name_the_rank_and_the_global_env():
    env = functools.partial(FailingEnv, where="step", after=2, fail_env=5)
    with pytest.raises(WorkerError) as info:
        with sampling.make_sampler("cpu", env, lambda o: np.zeros(len(o), np.int64),
                                   batch_T=5, batch_B=4, n_workers=2, rank=1,
                                   world_size=2) as s:
            s.obtain_samples()
    # README, "Many machines": "cpu sampler of rank 1: worker 0 (envs 4..5) raised
    # RuntimeError: ... (in env 5, step 2 of the batch)"
    text = str(info.value)
    assert re.match(r"cpu sampler of rank 1: worker 0 \(envs 4\.\.5\) raised RuntimeError: "
                    r"boom in step of env 5 \(in env 5, step 2 of the batch\)", text), text
    assert (info.value.worker, list(info.value.envs)) == (0, [4, 5])


def test_serial_errors_name_the_global_env():
    """serial raises the env's own exception in the rank's process; it says which env."""
    env = functools.partial(FailingEnv, where="step", after=2, fail_env=5)
    with pytest.raises(RuntimeError, match="boom") as info:
        with sampling.make_sampler("serial", env, lambda o: np.zeros(len(o), np.int64),
                                   batch_T=5, batch_B=4, rank=1, world_size=2) as s:
            s.obtain_samples()
    assert info.value.sampling_where == "env 5, step 2 of the batch"


# -- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("rank, world_size, error, match", [
    (2, 2, ValueError, r"rank must be in \[0, world_size\).*rank=2.*world_size=2"),
    (-1, 2, ValueError, "rank must be >= 0"),
    (0, 0, ValueError, "world_size must be >= 1"),
    (1.0, 2, TypeError, "rank must be an int"),
    (True, 2, TypeError, "rank must be an int"),
    (0, "2", TypeError, "world_size must be an int"),
])
def test_bad_rank_is_refused_before_anything_starts(rank, world_size, error, match):
    def env_fn():
        raise AssertionError("no env may be built")
    with pytest.raises(error, match=match):
        sampling.make_sampler("cpu", env_fn, lambda o: o, batch_T=2, batch_B=2, rank=rank,
                              world_size=world_size)


# -- the launcher's variables -------------------------------------------------------------
@pytest.mark.parametrize("environ, want", [
    ({}, sd.Launch(0, 1, 0, 1, "none")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
      "TORCHELASTIC_RUN_ID": "x"}, sd.Launch(3, 4, 1, 2, "torchrun")),
    ({"RANK": "1", "WORLD_SIZE": "2"}, sd.Launch(1, 2, 0, 1, "torchrun")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2",
      "SLURM_TASKS_PER_NODE": "3(x2)", "SLURM_NODEID": "1"}, sd.Launch(5, 6, 2, 3, "slurm")),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_LOCALID": "0",
      "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURM_NODEID": "2"}, sd.Launch(4, 5, 0, 1, "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
     sd.Launch(2, 4, 0, 2, "mpi")),
    ({"PMI_RANK": "1", "PMI_SIZE": "3"}, sd.Launch(1, 3, 0, 1, "mpi")),
    # torchrun under srun (one torchrun per node): torchrun's variables are the ranks'.
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
      "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
     sd.Launch(3, 4, 1, 2, "torchrun")),
    # RANK exported by hand from Slurm's: they agree.
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
     sd.Launch(1, 2, 0, 1, "torchrun")),
    # mpirun inside an sbatch script: the batch step's Slurm variables are not the ranks'.
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "SLURM_PROCID": "0",
      "SLURM_NTASKS": "4"}, sd.Launch(2, 4, 0, 1, "mpi")),
    # Slurm without its local variables (as if alone on the node).
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2"},
     sd.Launch(1, 2, 0, 1, "slurm")),
])
def test_launch_reads_the_launchers_variables(environ, want):
    assert sd.launch(environ) == want


@pytest.mark.parametrize("environ, match", [
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
     "contradict each other: RANK=0, WORLD_SIZE=2 .* but SLURM_PROCID=1, SLURM_NTASKS=2"),
    ({"PMI_RANK": "0", "PMI_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1",
      "OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=4 .mpi. "
                                    "but PMI_RANK=0, PMI_SIZE=4 .mpi."),
    ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS is set but SLURM_PROCID is not"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, r"RANK='one' is not a non-negative int"),
    ({"RANK": "1_0", "WORLD_SIZE": "20"}, r"RANK='1_0' is not a non-negative int"),
    ({"RANK": "+1", "WORLD_SIZE": "2"}, r"RANK='\+1' is not a non-negative int"),
    ({"RANK": "\u0661", "WORLD_SIZE": "2"}, "is not a non-negative int in decimal digits"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "is not a non-negative int"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
     "LOCAL_RANK is set but LOCAL_WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"},
     "a node cannot hold more ranks than there are"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
     "SLURM_LOCALID is set but SLURM_TASKS_PER_NODE is not"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
      "SLURM_TASKS_PER_NODE": "2(3)", "SLURM_NODEID": "0"}, "is not Slurm's form"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
      "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "2"}, "describes 2 nodes"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 with WORLD_SIZE=2: a rank must be in"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
     r"LOCAL_RANK=2 with 2 torchrun ranks on this node"),
])
def test_launch_refuses_contradictions(environ, match):
    with pytest.raises(ValueError, match=match):
        sd.launch(environ)


def test_launch_reads_os_environ(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    me = sd.launch()
    assert (me.rank, me.world_size) == (1, 2)
    assert me.sampler_kwargs() == {"rank": 1, "world_size": 2}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no sched_getaffinity")
def test_each_local_rank_gets_its_share_of_the_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    shares = [sd.Launch(r, 4, r % 2, 2).cpus() for r in range(2)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sd.Launch(1, 2, 1, 2).cpu_affinity(2) == [[4, 5], [6, 7]]
    assert sd.Launch(1, 2, 1, 2).cpu_affinity(3) == [[4], [5], [6, 7]]
    assert sd.Launch(0, 3, 0, 3).cpu_affinity(4) == [[0], [1], [0], [1]]  # 2 CPUs, 4 workers
    assert sd.Launch(1, 2, 1, 2).cpus(split=False) == list(range(8))
    # Confined to fewer CPUs than the node has (srun --cpus-per-task): the launcher split.
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert sd.Launch(1, 2, 1, 2).cpus() == list(range(8))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    with pytest.raises(ValueError, match="cannot each have CPUs of their own"):
        sd.Launch(1, 2, 1, 2).cpus(split=True)
    with pytest.raises(ValueError, match="n_workers must be an int >= 1"):
        sd.Launch(0, 1).cpu_affinity(0)


def test_collectives_without_a_process_group_are_this_ranks_own():
    """One process, no torch.distributed group: gathering returns the episodes, and
    mean_stats is over them."""
    with sampling.make_sampler("serial", ENV, RecurrentAgent(), batch_T=20, batch_B=2,
                               traj_info=IdTraj) as s:
        trajs = s.obtain_samples().traj_infos
    assert len(trajs) > 2
    assert sd.gather_traj_infos(trajs) is trajs
    stats = sd.mean_stats(trajs, keys=("Return", "Length"))
    assert stats["episodes"] == len(trajs)
    assert stats["Length"] == pytest.approx(np.mean([t.Length for t in trajs]))
    assert np.isnan(sd.mean_stats([])["Return"])
    with pytest.raises(KeyError, match="no 'Nope'"):
        sd.mean_stats(trajs, keys=("Nope",))
    # Lists without episode ends (plain lists) are joined rank after rank.
    assert sd.merge_episodes([[1, 2], [3]]) == [1, 2, 3]


def test_launch_needs_no_torch_and_the_core_never_imports_distributed():
    code = ("import sys, numpy, sampling; "
            "s = sampling.make_sampler('serial', sampling.CartPole, lambda o: o[:, 0] > 0, "
            "batch_T=2, batch_B=2, rank=1, world_size=2); s.obtain_samples(); s.shutdown(); "
            "assert 'sampling.distributed' not in sys.modules; "
            "import sampling.distributed as sd; assert sd.launch({}).world_size == 1; "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr


# -- what workers inherit -----------------------------------------------------------------
LAUNCHER_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "node0",
                "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "job", "SLURM_PROCID": "1",
                "SLURM_NTASKS": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                "PMI_RANK": "1", "PMI_SIZE": "2"}
KEPT_ENV = {"SLURM_JOB_ID": "77", "MY_SETTING": "kept"}  # not rank variables


class EnvRecordingEnv(CountingEnv):
    """Writes the environment its process sees to ``<folder>/<pid>.json`` when built."""

    def __init__(self, folder):
        super().__init__()
        names = set(LAUNCHER_ENV) | set(KEPT_ENV)
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
            json.dump({k: v for k, v in os.environ.items() if k in names}, f)


@pytest.fixture
def restarted_forkserver():
    """This process's forkserver restarted now, with the environment as the test set it
    (the worst case: a forkserver started before the sampler, by anything, while the
    launcher's variables were set, hands them to its children). Stopped again afterwards,
    before the test's environment is restored: the next sampler of this process (the rest of
    an xdist worker's session) starts a fresh one, from the environment as it was."""
    from multiprocessing import forkserver
    forkserver._forkserver._stop()
    forkserver.ensure_running()
    yield
    forkserver._forkserver._stop()


@pytest.mark.start_method_matters  # the environment a child gets, forkserver's included
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_do_not_inherit_the_launchers_rank_variables(method, tmp_path, monkeypatch,
                                                             request):
    for k, v in {**LAUNCHER_ENV, **KEPT_ENV}.items():
        monkeypatch.setenv(k, v)
    if method == "forkserver":
        request.getfixturevalue("restarted_forkserver")  # with the variables set above
    env = functools.partial(EnvRecordingEnv, str(tmp_path))
    with sampling.make_sampler("cpu", env, lambda o: np.zeros(len(o), np.int64), batch_T=2,
                               batch_B=2, n_workers=2, start_method=method, **sd.launch(
                                   ).sampler_kwargs()) as s:
        s.obtain_samples()
        seen = {int(p.stem): json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    workers = {pid: e for pid, e in seen.items() if pid != os.getpid()}
    assert len(workers) == 2
    for e in workers.values():
        assert e == KEPT_ENV, e
    assert seen[os.getpid()] == {**LAUNCHER_ENV, **KEPT_ENV}  # the probe env, in the parent
    assert all(os.environ[k] == v for k, v in LAUNCHER_ENV.items())  # the parent's are back
