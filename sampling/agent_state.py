"""What a copy of the agent carries: parameters to mirror and random generators to reseed.

Imports numpy and :mod:`sampling.tree`; torch only if the user already imported it.
A ``cpu``-kind worker runs its own copy of the agent, so the parent must (1) copy its
parameters into every copy at each batch and (2) give each copy its own random streams;
and the sampler's own calls of the agent (the probe) must not consume the user's random
state. This module finds those things by walking what the agent references.

The walk: the agent object itself, then its attributes (``vars``, ``__slots__``, and its
class's), items of dicts/lists/tuples, closure cells, the ``__self__`` of bound methods,
``functools.partial`` arguments, and the globals and default arguments of a plain
function, up to :data:`WALK_DEPTH` levels deep. It does not descend into torch modules (their
``state_dict`` covers submodules), numpy arrays, modules, classes, builtins, spaces or
envs.
"""
from __future__ import annotations

import functools
import random
import sys
import types
from typing import Any, Iterator

import numpy as np

from .tree import get, to_numpy, tree_leaves

__all__ = ["find", "Params", "load_params", "check_same_params", "independent_copy",
           "unmirrored_arrays", "device_of", "reseed", "RngGuard", "worker_seed"]

# How deep the walk goes from the agent: agent.model.net is 2, a closure's object's module
# 3. Deeper graphs are usually datasets, environments or framework internals, not policy
# state, and walking them would cost more than the batch.
WALK_DEPTH = 4
# Containers longer than this are data (a replay buffer, a dataset), not policy state: the
# walk skips them rather than spend seconds there.
WALK_ITEMS = 256
# A domain-separation word, so worker streams never coincide with decorrelation's
# ``default_rng([seed, b, 0xDEC0])``.
_GLOBAL_TAG = 0x5EED


def _torch():
    return sys.modules.get("torch")  # only if the user imported it: never import it here


def _children(obj: Any) -> Iterator[tuple]:
    """``(name, child)`` pairs the walk follows from ``obj``."""
    if isinstance(obj, (dict, list, tuple)) and len(obj) > WALK_ITEMS:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k), v
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield str(i), v
    elif isinstance(obj, functools.partial):
        yield "func", obj.func
        for i, v in enumerate(obj.args):
            yield str(i), v
        yield from obj.keywords.items()
    elif isinstance(obj, types.MethodType):
        yield "__self__", obj.__self__
        yield "__func__", obj.__func__
    elif isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                yield name, cell.cell_contents
            except ValueError:  # an empty cell
                pass
        g = obj.__globals__
        for name in obj.__code__.co_names:
            if name in g:
                yield name, g[name]
        for i, v in enumerate(obj.__defaults__ or ()):  # def policy(obs, net=NET)
            yield f"default{i}", v
        yield from (obj.__kwdefaults__ or {}).items()
    else:
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            yield from d.items()
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                yield slot, getattr(obj, slot)
        # Class attributes (``class Agent: net = Net()``) that no instance attribute hides;
        # methods and descriptors are code, not state.
        for klass in type(obj).__mro__[:-1]:  # all but object
            for name, v in vars(klass).items():
                if not (name.startswith("__") or isinstance(v, _CODE)
                        or (isinstance(d, dict) and name in d)):
                    yield name, v


# Class attributes that are code (the walk skips them).
_CODE = (types.FunctionType, staticmethod, classmethod, property, types.MemberDescriptorType,
         types.GetSetDescriptorType, type)


_LEAF_TYPES = (type, types.ModuleType, types.BuiltinFunctionType, str, bytes, int, float,
               complex, bool, type(None), np.ndarray, np.generic, np.dtype)


def _foreign(obj: Any) -> bool:
    """Spaces and gymnasium envs an agent may hold: their arrays (bounds, state) and
    generators are not the agent's parameters or exploration streams. (Envs are known by
    their gymnasium base class only: an agent that keeps its spaces as attributes looks
    like an env by duck typing, and must still be walked.)"""
    if hasattr(obj, "sample") and hasattr(obj, "contains"):
        return True
    return any(c.__module__.split(".")[0] in ("gymnasium", "gym") for c in type(obj).__mro__)


def find(agent: Any) -> dict:
    """Walk ``agent``; return ``{"modules", "generators", "arrays"}``, each a list of
    ``(path, object)`` in a deterministic order (the same in every copy of the agent)."""
    torch = _torch()
    module_t = torch.nn.Module if torch is not None else ()
    gen_t = (np.random.RandomState, np.random.Generator, random.Random) + (
        (torch.Generator,) if torch is not None else ())
    array_t = (np.ndarray, torch.Tensor) if torch is not None else np.ndarray
    out: dict = {"modules": [], "generators": [], "arrays": []}
    seen: set = set()

    def visit(path: str, obj: Any, depth: int) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if module_t and isinstance(obj, module_t):
            out["modules"].append((path, obj))
        elif isinstance(obj, gen_t):
            out["generators"].append((path, obj))
        elif isinstance(obj, array_t):
            out["arrays"].append((path, obj))
        elif depth < WALK_DEPTH and not isinstance(obj, _LEAF_TYPES) and not _foreign(obj):
            for name, child in list(_children(obj)):
                if isinstance(name, str) and name.startswith("__") and name not in (
                        "__self__", "__func__"):
                    continue
                visit(f"{path}.{name}" if path else str(name), child, depth + 1)

    visit("", agent, 0)
    return out


# -- parameters -------------------------------------------------------------------------
class Params:
    """The parameters a ``cpu``-kind worker's copy of ``agent`` must receive before each
    batch, by the rule documented in docs/agents.md:

    * ``agent.shared_arrays()`` if the agent has it (a nested dict of arrays or tensors);
    * otherwise the parameters and buffers (``state_dict``) of every torch module the walk
      finds at construction, named ``"<path>/<state_dict key>"``;
    * otherwise nothing (:attr:`empty`).
    """

    def __init__(self, agent: Any):
        self.agent = agent
        self.explicit = callable(getattr(agent, "shared_arrays", None))
        self.modules = [] if self.explicit else find(agent)["modules"]

    @property
    def empty(self) -> bool:
        return not self.explicit and not self.modules

    def arrays(self) -> dict:
        """The current parameters (views where they are on the CPU), by name."""
        if self.explicit:
            return self.agent.shared_arrays()
        return {f"{path or 'agent'}/{name}": t for path, m in self.modules
                for name, t in m.state_dict(keep_vars=True).items()}


def load_params(own: Any, shared: dict) -> None:
    """Copy ``shared`` (the segment's arrays, or another copy's :meth:`Params.arrays`) into
    ``own`` (:meth:`Params.arrays` of a copy), in place, whatever the leaves are (arrays,
    or tensors on any device)."""
    for path, src in tree_leaves(shared):
        dst = get(own, path)
        if hasattr(dst, "detach"):
            torch = _torch()
            with torch.no_grad():
                dst.copy_(src if isinstance(src, torch.Tensor) else torch.from_numpy(src))
        else:
            np.copyto(dst, to_numpy(src))


def check_same_params(own: Any, theirs: Any, who: str) -> None:
    """A copy's parameters (``own``) must have the original's names (``theirs``): else a
    RuntimeError naming the differences and ``who`` has them."""
    mine = {path for path, _ in tree_leaves(own)}
    other = {path for path, _ in tree_leaves(theirs)}
    if mine != other:
        raise RuntimeError(
            f"{who} has parameters {sorted(mine - other)[:3]} that the original agent lacks, "
            f"or lacks {sorted(other - mine)[:3]}: the copy is built differently from the "
            f"original (e.g. modules made at random or per process). Give the agent a "
            f"shared_arrays() method that returns the same arrays in every copy")


def independent_copy(agent: Any) -> Any:
    """A copy of ``agent`` that shares none of its state (the torch modules, arrays and
    generators the walk finds): ``copy.deepcopy``, or where that shares some (a function
    is "copied" as itself), a cloudpickle round trip (closures and ``__main__`` globals by
    value, as a spawn worker gets them). An agent without such state is its own copy.
    TypeError if neither copy is independent."""
    import copy as copy_module
    if not any(find(agent).values()):
        return agent
    errors = []
    for make in (copy_module.deepcopy, _pickled_copy):
        try:
            made = make(agent)
        except Exception as e:
            errors.append(f"{make.__name__}: {type(e).__name__}: {e}")
            continue
        shared = _shared_state(agent, made)
        if not shared:
            return made
        errors.append(f"{make.__name__}: the copy shares {', '.join(shared[:3])}")
    raise TypeError(
        f"policy_lag=1 with an action-server kind serves actions from a copy of the agent "
        f"while the caller trains, and this agent cannot be copied apart from its state "
        f"({'; '.join(errors)}). Hold its model, arrays and generators in an object or a "
        f"closure (not module globals, which every copy shares) and keep it deep-copyable "
        f"or picklable, or use the 'cpu' or 'serial' kind")


def _pickled_copy(agent: Any) -> Any:
    import cloudpickle
    return cloudpickle.loads(cloudpickle.dumps(agent))


def _shared_state(a: Any, b: Any) -> list:
    """Paths of ``b``'s modules, generators and arrays that are ``a``'s (or share memory)."""
    fa, fb = find(a), find(b)
    theirs = {id(o) for key in ("modules", "generators") for _, o in fa[key]}
    out = [path or "agent" for key in ("modules", "generators") for path, o in fb[key]
           if id(o) in theirs]
    arrays = [o for _, o in fa["arrays"]]
    for path, x in fb["arrays"]:
        for y in arrays:
            if x is y or (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                          and np.shares_memory(x, y)) or (
                    hasattr(x, "data_ptr") and hasattr(y, "data_ptr") and x.numel()
                    and x.data_ptr() == y.data_ptr()):
                out.append(path or "agent")
                break
    return out


def device_of(agent: Any) -> str | None:
    """The device type (``"cuda"``, ``"mps"``, ...) of a tensor or module the agent holds off
    the CPU anywhere the walk reaches (a policy function closing over a model too); None if
    all are on the CPU, or torch is not imported."""
    if _torch() is None:
        return None
    found = find(agent)
    tensors = [t for _, m in found["modules"] for t in m.state_dict(keep_vars=True).values()]
    for t in tensors + [t for _, t in found["arrays"]]:
        device = getattr(getattr(t, "device", None), "type", "cpu")
        if device != "cpu":
            return device
    return None


def unmirrored_arrays(agent: Any) -> list:
    """Paths of float arrays/tensors the agent holds outside torch modules: a ``cpu``-kind
    copy would keep them frozen unless ``shared_arrays()`` returns them."""
    return [path or "agent" for path, a in find(agent)["arrays"] if _is_float_dtype(a)]


def _is_float_dtype(a: Any) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype.kind == "f" and a.size > 0
    return bool(getattr(a, "is_floating_point", lambda: False)()) and a.numel() > 0


# -- random streams ---------------------------------------------------------------------
def worker_seed(seed: int, first_env: int, restart: int = 0) -> np.random.SeedSequence:
    """The seed sequence of the worker whose first env is ``first_env``: a function of the
    envs it runs, not of the worker count or the start method."""
    return np.random.SeedSequence([seed, first_env, _GLOBAL_TAG] + ([restart] if restart else []))


def reseed(agent: Any, seq: np.random.SeedSequence) -> None:
    """Seed the global generators (``random``, ``np.random``, torch's if loaded) and every
    generator the agent holds from ``seq``, each with its own stream."""
    words = seq.generate_state(4, np.uint64)
    random.seed(int(words[0]))
    np.random.seed(int(words[1]) % 2**32)
    torch = _torch()
    if torch is not None:
        torch.manual_seed(int(words[2]) % 2**63)
    if agent is None:
        return
    gens = find(agent)["generators"]
    for child, (_path, g) in zip(seq.spawn(len(gens)), gens):
        _seed_generator(g, child)


def _seed_generator(g: Any, seq: np.random.SeedSequence) -> None:
    word = int(seq.generate_state(1, np.uint64)[0])
    if isinstance(g, np.random.Generator):
        # In place: closures that captured this generator (RandomAgent's) see the new state.
        g.bit_generator.state = type(g.bit_generator)(seq).state
    elif isinstance(g, np.random.RandomState):
        g.seed(word % 2**32)
    elif isinstance(g, random.Random):
        g.seed(word)
    else:  # torch.Generator
        g.manual_seed(word % 2**63)


class RngGuard:
    """Context manager: restore the global random states (and those of the generators
    ``agent`` holds) on exit, so the sampler's own agent and env calls consume none of
    the user's random streams."""

    def __init__(self, agent: Any = None):
        self.agent = agent

    def __enter__(self) -> RngGuard:
        self.py = random.getstate()
        self.np = np.random.get_state()
        torch = _torch()
        self.torch = torch.get_rng_state() if torch is not None else None
        self.cuda = (torch.cuda.get_rng_state_all()
                     if torch is not None and torch.cuda.is_initialized() else None)
        self.gens = [(g, _get_state(g)) for _, g in find(self.agent)["generators"]] \
            if self.agent is not None else []
        return self

    def __exit__(self, *exc) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch = _torch()
        if torch is not None:
            if self.torch is not None:
                torch.set_rng_state(self.torch)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
        for g, state in self.gens:
            _set_state(g, state)


def _get_state(g: Any) -> Any:
    if isinstance(g, np.random.Generator):
        return g.bit_generator.state
    return g.get_state() if not isinstance(g, random.Random) else g.getstate()


def _set_state(g: Any, state: Any) -> None:
    if isinstance(g, np.random.Generator):
        g.bit_generator.state = state
    elif isinstance(g, random.Random):
        g.setstate(state)
    else:  # np.random.RandomState, torch.Generator
        g.set_state(state)
