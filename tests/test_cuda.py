"""CUDA paths, where a CUDA device exists (skipped elsewhere): an agent on the GPU in the
action-server kinds gives the batches the same agent gives on the CPU, batches reach the GPU
through pinned staging, auto sees a model on the GPU through a policy function, and the cpu
kind refuses a CUDA agent with the fix."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from torch import nn  # noqa: E402

import sampling  # noqa: E402
from sampling.torch_agent import TorchAgent, to_torch  # noqa: E402
from tests.helpers import SERVED, assert_runs_equal, snapshot  # noqa: E402

N_BATCHES = 3


def _policy(device):
    """A deterministic policy (argmax of a fixed linear map) on ``device``, as a plain
    function closing over the model."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(device)

    @torch.no_grad()
    def policy(observation):
        return model(torch.as_tensor(observation, device=device)).argmax(-1).cpu().numpy()
    return policy


def _run(kind, policy, **kw):
    with sampling.make_sampler(kind, sampling.CartPole, policy, batch_T=32, batch_B=4,
                               seed=3, **kw) as s:
        return [snapshot(b) for b in s.steps(N_BATCHES)]


@pytest.mark.parametrize("kind", SERVED)
def test_an_agent_on_the_gpu_gives_the_cpu_agent_s_batches(kind):
    ref = _run("serial", _policy("cpu"))
    assert_runs_equal(_run(kind, _policy("cuda"), n_workers=2), ref)


def test_a_torch_agent_on_the_gpu_with_policy_lag():
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).cuda()
    agent = TorchAgent(model, device="cuda")
    with sampling.make_sampler("gpu", sampling.CartPole, agent, batch_T=16, batch_B=4,
                               n_workers=2, policy_lag=1) as s:
        for batch in s.steps(N_BATCHES):
            obs = to_torch(batch, "cuda")["observation"]
            assert obs.device.type == "cuda" and obs.shape == (16, 4, 4)
            np.testing.assert_array_equal(obs.cpu().numpy(), batch.observation)


def test_auto_keeps_a_gpu_policy_function_in_this_process():
    with sampling.make_sampler("auto", sampling.CartPole, _policy("cuda"), batch_T=8,
                               batch_B=4, n_workers=2) as s:
        assert s.kind != "cpu", s.auto_reason
        assert "cpu (the agent is on a GPU)" in s.auto_reason, s.auto_reason


def test_the_cpu_kind_refuses_a_cuda_agent_with_the_fix():
    with pytest.raises(ValueError, match=r"holds tensors or modules on cuda: use the 'gpu' or "
                                         r"'alternating' kind"):
        sampling.make_sampler("cpu", sampling.CartPole, _policy("cuda"), batch_T=8, batch_B=4)
