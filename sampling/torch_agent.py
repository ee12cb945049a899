"""Torch agents: an ``nn.Module`` policy as a sampler agent, and batches as torch tensors.

The only module of the package that imports torch, and nothing imports it implicitly:
``import sampling`` stays torch-free. Imports :mod:`sampling.tree` for tree helpers.
Non-goals: training algorithms, action clipping, models on devices other than CPU in
the ``cpu`` kind (its workers run copies of the agent on CPU).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .tree import is_tree, to_numpy, tree_map

__all__ = ["TorchAgent", "to_torch", "PinnedStaging"]

DISTRIBUTIONS = ("categorical", "gaussian")


class TorchAgent:
    """A sampler agent around a torch policy: ``TorchAgent(model)``.

    Model contract (inputs are tensors on ``device``, with the env's dtypes, batched over
    the ``n`` envs of one call; a dict observation arrives as a dict of tensors):

    * feed-forward: ``model(obs) -> out`` or ``(out, value)``;
    * ``recurrent=True``: ``model(obs, state) -> (out, value, new_state)``.

    ``out`` is the logits ``[n, n_actions]`` for ``distribution="categorical"``, the mean
    ``[n, action_dim]`` for ``"gaussian"``, whose log-std is either ``model.log_std`` (a
    learned parameter broadcast against the mean) or given with the mean as
    ``out = (mean, log_std)``. ``value`` is ``[n]`` (or ``[n, 1]``) or None. ``state``
    is a tensor or a tuple of tensors laid out like the hidden state of ``nn.GRU`` /
    ``nn.LSTM`` (envs on dim 1: ``[layers, n, hidden]``); it is None on the very first
    call and means zeros, as for those modules. To feed ``prev_action``/``prev_reward``
    or adapt another signature, override :meth:`forward`.

    ``step`` returns the actions (sampled; argmax / mean in eval mode) and ``agent_info``
    with ``log_prob`` and, if the model returns one, ``value``; a recurrent agent also
    records ``state``: each env's state before the step (``[T, B, layers, ...]`` in a batch,
    a dict ``{"0": h, "1": c}`` for tuple states), so ``agent_info["state"][0]`` is the
    state at the start of the batch (:meth:`batch_state` turns it back into the model's
    layout). Recurrent state is kept per global env id (training envs ``0..B-1``, eval envs
    after them) and reset to zeros by ``reset_one``. Sampling runs under ``torch.no_grad``
    with the agent's own generator, seeded at the first step after ``reset()`` from
    ``seed`` and the first env id of that call, so every ``cpu``-kind worker draws its own
    reproducible stream. The agent never switches the model's ``train()``/``eval()``
    mode, which belongs to the training loop.
    """

    def __init__(self, model: torch.nn.Module, *, distribution: str = "categorical",
                 device: Any = "cpu", recurrent: bool = False, seed: int = 0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))}"
                             f", got {distribution!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.distribution = distribution
        self.recurrent = bool(recurrent)
        self.seed = int(seed)
        self.greedy = False
        self._state: tuple | None = None  # recurrent: per leaf [layers, capacity, ...]
        self._tuple_state = False
        self._gen: torch.Generator | None = None

    # -- the agent protocol ------------------------------------------------------------
    def reset(self) -> None:
        """Zero every env's recurrent state; reseed sampling at the next step."""
        if self._state is not None:
            for s in self._state:
                s.zero_()
        self._gen = None

    def reset_one(self, env_id: int) -> None:
        """Zero the recurrent state of one env (before its new episode's first step)."""
        if self._state is not None and env_id < self._state[0].shape[1]:
            for s in self._state:
                s[:, env_id] = 0

    def sample_mode(self, itr: int) -> None:
        self.greedy = False

    def eval_mode(self, itr: int) -> None:
        self.greedy = True

    @torch.no_grad()
    def step(self, observation, prev_action, prev_reward, env_ids=None):
        """``(action, agent_info)`` for a batch of envs; see the class docstring."""
        ids = self._ids(prev_reward, env_ids)
        state = self._gather(ids)
        out, value, new_state = self._call(observation, prev_action, prev_reward, state)
        action, log_prob = self._act(out, ids)
        info = {"log_prob": log_prob}
        if value is not None:
            info["value"] = value
        if self.recurrent:
            if state is None:  # first call ever: learn the state's layout
                self._tuple_state = not torch.is_tensor(new_state)
                state = self._gather(ids, like=_leaves(new_state))
            info["state"] = self._record(state)
            for s, new in zip(self._state, _leaves(new_state)):
                s[:, torch.as_tensor(ids, device=self.device)] = new
        return to_numpy(action), tree_map(to_numpy, info)

    @torch.no_grad()
    def value(self, observation, prev_action, prev_reward, env_ids=None) -> np.ndarray:
        """The model's value of ``observation`` (for ``bootstrap_value``); no state change."""
        ids = self._ids(prev_reward, env_ids)
        _, value, _ = self._call(observation, prev_action, prev_reward, self._gather(ids))
        if value is None:
            raise TypeError("TorchAgent.value: the model returns no value; return "
                            "(out, value) from it to use bootstrap_value=True")
        return to_numpy(value)

    def shared_arrays(self) -> dict:
        """The model's parameters and buffers, by name: numpy views on the CPU (zero-copy;
        the ``cpu`` kind copies the parent's values into every worker's model before each
        batch), the tensors themselves elsewhere (the action server's copy with
        ``policy_lag=1`` takes them on the device; ``make_sampler`` refuses a CUDA agent in
        the ``cpu`` kind)."""
        return {name: t.detach().numpy() if self.device.type == "cpu" else t.detach()
                for name, t in self.model.state_dict(keep_vars=True).items()}

    # -- for training loops ------------------------------------------------------------
    def forward(self, observation, prev_action, prev_reward, state=None) -> tuple:
        """Run the model on tensors; return ``(out, value, new_state)``.

        Override to feed ``prev_action``/``prev_reward`` or to adapt another model.
        """
        if self.recurrent:
            result = self.model(observation, state)
            if not isinstance(result, tuple) or len(result) != 3:
                raise TypeError("a recurrent model must return (out, value, new_state), got "
                                f"{type(result).__name__}")
            return result
        result = self.model(observation)
        if torch.is_tensor(result):
            return result, None, None
        if isinstance(result, tuple) and len(result) == 2:
            return result[0], result[1], None
        raise TypeError(f"the model must return out or (out, value), got {type(result).__name__}")

    def dist(self, out, validate_args: bool | None = None) -> torch.distributions.Distribution:
        """The action distribution for a model output ``out`` (logits, mean or (mean, log_std))."""
        if self.distribution == "categorical":
            return torch.distributions.Categorical(logits=out, validate_args=validate_args)
        if isinstance(out, tuple):
            mean, log_std = out
        else:
            mean, log_std = out, getattr(self.model, "log_std", None)
            if log_std is None:
                raise TypeError("a gaussian model must return (mean, log_std) as its output or "
                                "have a log_std parameter, e.g. self.log_std = "
                                "nn.Parameter(torch.zeros(action_dim))")
        std = log_std.exp().expand_as(mean)
        normal = torch.distributions.Normal(mean, std, validate_args=validate_args)
        return torch.distributions.Independent(normal, 1, validate_args=validate_args)

    def batch_state(self, state, t: int = 0):
        """The recorded ``agent_info["state"]`` at step ``t`` (arrays or tensors shaped
        ``[T, B, layers, ...]``) in the model's layout (``[layers, B, ...]``) on ``device``:
        ``t=0`` gives the state at the start of the batch."""
        leaves = [state[k] for k in sorted(state, key=int)] if is_tree(state) else [state]
        out = tuple(torch.as_tensor(x[t], device=self.device).transpose(0, 1).contiguous()
                    for x in leaves)
        return out if is_tree(state) else out[0]

    # -- internals ---------------------------------------------------------------------
    def _ids(self, prev_reward, env_ids) -> np.ndarray:
        return np.arange(len(prev_reward)) if env_ids is None else np.asarray(env_ids)

    def _call(self, observation, prev_action, prev_reward, state) -> tuple:
        obs = tree_map(self._tensor, observation)
        out, value, new_state = self.forward(obs, self._tensor(prev_action),
                                             self._tensor(prev_reward), state)
        if value is not None and value.dim() == 2 and value.shape[1] == 1:
            value = value[:, 0]
        return out, value, new_state

    def _tensor(self, a) -> torch.Tensor:
        t = torch.as_tensor(a)
        return t if self.device.type == "cpu" else t.to(self.device)

    def _act(self, out, ids: np.ndarray) -> tuple:
        d = self.dist(out, validate_args=False)  # also takes calls for no env (an empty slice)
        greedy = self.greedy or len(ids) == 0
        if self.distribution == "categorical":
            if greedy:
                action = d.logits.argmax(-1)
            else:
                action = torch.multinomial(d.probs, 1, generator=self._generator(ids))[:, 0]
            return action, d.log_prob(action)
        normal = d.base_dist
        action = normal.loc if greedy else normal.loc + normal.scale * torch.randn(
            normal.loc.shape, generator=self._generator(ids), device=normal.loc.device,
            dtype=normal.loc.dtype)
        return action, normal.log_prob(action).sum(-1)  # = d.log_prob, also for no env

    def _generator(self, ids: np.ndarray) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator(device=self.device)
            self._gen.manual_seed(self.seed * 1_000_003 + int(ids[0]))
        return self._gen

    def _gather(self, ids: np.ndarray, like: tuple | None = None):
        """The recurrent state of envs ``ids`` (None before the first call), growing the
        per-env storage to cover them; ``like`` allocates it from a model's new state."""
        if not self.recurrent:
            return None
        if self._state is None:
            if like is None:
                return None
            self._state = tuple(s.new_zeros((s.shape[0], 0) + s.shape[2:]) for s in like)
        need = int(ids.max()) + 1 if len(ids) else 0
        if need > self._state[0].shape[1]:
            self._state = tuple(torch.cat([s, s.new_zeros((s.shape[0], need - s.shape[1])
                                                         + s.shape[2:])], 1)
                                for s in self._state)
        idx = torch.as_tensor(ids, device=self.device)
        leaves = tuple(s[:, idx] for s in self._state)
        return leaves if self._tuple_state else leaves[0]

    def _record(self, state) -> Any:
        leaves = [s.transpose(0, 1) for s in _leaves(state)]  # [n, layers, ...] per env
        return {str(i): s for i, s in enumerate(leaves)} if self._tuple_state else leaves[0]

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_gen"] = None  # reseeded at the first step after reset()
        return d


def _leaves(state) -> tuple:
    return (state,) if torch.is_tensor(state) else tuple(state)


# -- batches as tensors ----------------------------------------------------------------
class PinnedStaging:
    """Page-locked host buffers, reused across batches, for fast host-to-GPU copies.

    Each call copies every array into its pinned buffer (a plain memcpy, after which the
    sampler may overwrite the batch) and starts a ``non_blocking`` copy to the device on
    the current CUDA stream. Before overwriting the buffers on the next call it waits for
    the previous copies (a CUDA event), not for the GPU's other work.
    """

    def __init__(self):
        self._buffers: dict = {}
        self._copied = None  # CUDA event recorded after the last call's copies

    def to(self, tree: Any, device: Any) -> Any:
        device = torch.device(device)
        if self._copied is not None:
            self._copied.synchronize()
        out = _map_arrays(tree, lambda path, a: self._copy(path, a, device))
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(device))
        return out

    def _copy(self, path: tuple, a: np.ndarray, device: torch.device) -> torch.Tensor:
        src = torch.from_numpy(a)
        key = (path, a.shape, a.dtype.str)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        buf.copy_(src)
        return buf.to(device, non_blocking=True)


_staging: dict = {}  # device -> PinnedStaging used by to_torch by default


def to_torch(batch: Any, device: Any = None, staging: PinnedStaging | None = None) -> Any:
    """A batch (nested dicts of numpy arrays) as the same dicts of torch tensors.

    On CPU (``device`` None or ``"cpu"``) every tensor is ``torch.from_numpy`` of the
    batch array: zero-copy, so valid only until the next batch, like the batch itself.
    On CUDA, arrays go through pinned staging buffers reused across calls (``staging``,
    default one per device) with ``non_blocking`` copies: the result is the GPU's own
    memory and stays valid. Non-array entries (``traj_infos``) pass through unchanged.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu":
        return _map_arrays(batch, lambda path, a: torch.from_numpy(a))
    if device.type == "cuda":
        if staging is None:
            staging = _staging.setdefault(str(device), PinnedStaging())
        return staging.to(batch, device)
    return _map_arrays(batch, lambda path, a: torch.from_numpy(a).to(device))


def _map_arrays(x: Any, fn, path: tuple = ()) -> Any:
    if isinstance(x, dict):
        return type(x)((k, _map_arrays(v, fn, path + (k,))) for k, v in x.items())
    return fn(path, x) if isinstance(x, np.ndarray) else x
