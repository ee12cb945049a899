"""Real ranks: two processes under torchrun (gloo on localhost) sample as one sampler with
twice the envs would, gather their episodes and evaluations in its order, share rank 0's
parameters (docs/examples/train_ddp.py is run by tests/test_docs.py).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.helpers import ROOT, assert_batches_equal  # noqa: E402
from tests.test_ranks import KEPT_ENV, N_BATCHES, columns, run  # noqa: E402

# torchrun's start (two ranks importing torch) and the job itself take seconds; a hang
# (a rank waiting for the other forever) must fail the test, not the CI run.
JOB_TIMEOUT_S = 240


def torchrun(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", str(script), *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


def test_two_torchrun_ranks_sample_as_one_sampler(tmp_path):
    torchrun(ROOT / "tests" / "distributed_script.py", str(tmp_path), cwd=tmp_path)
    with open(tmp_path / "result.pkl", "rb") as f:
        got = pickle.load(f)
    assert got["warned"] and "world_size=1" in got["warned"][0]
    assert "disagree with torch.distributed's process group (rank 0 of 2)" in got["refused"]
    assert got["same_weights"]
    for kind in ("cpu", "gpu"):
        one_batches, one_eval = run(kind, 8, eval_per_rank=4)
        mine = got[kind]
        for i in range(N_BATCHES):
            for r in range(2):
                snap = {k: v for k, v in mine["snapshots"][r][i].items() if k != "traj_infos"}
                assert_batches_equal(snap, columns(one_batches[i][0], 4 * r, 4 * r + 4),
                                     f"{kind}, batch {i}, rank {r}")
            stats, ends = mine["episodes"][i]
            assert ends == one_batches[i][1].ends
            assert stats == [t.stats() for t in one_batches[i][1]]
        stats, ends = mine["evaluation"]
        assert ends == one_eval.ends and stats == [t.stats() for t in one_eval]
        first = one_batches[0][1]
        assert mine["mean"]["episodes"] == len(first)
        assert mine["mean"]["Return"] == pytest.approx(np.mean([t.Return for t in first]))
    for r in range(2):
        seen = [json.loads(p.read_text()) for p in (tmp_path / f"env-{r}").glob("*.json")]
        assert sum("RANK" in e for e in seen) == 1  # the probe env, in the rank itself
        workers = [e for e in seen if "RANK" not in e]
        assert len(workers) == 2 and all(set(e) <= set(KEPT_ENV) for e in workers), seen
