"""The benchmark's inputs from command-line strings: an env factory, an agent, the options
every benchmark command shares.

Imports the core's public agents and its vector-env checks; gymnasium and torch only when
asked for (a gymnasium id, ``--agent mlp``).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import sys
from typing import Any, Callable

from ..agents import RandomAgent
from ..errors import close_all
from ..vector import autoreset_mode, is_vector, vector_width
from .errors import BenchError

__all__ = ["BenchError", "resolve_env", "check_env", "env_width", "make_agent", "import_torch",
           "checked_common", "print_report"]


def resolve_env(spec: str, kwargs: dict | None = None,
                option: str = "--env") -> Callable[[], Any]:
    """Return a picklable zero-argument env factory for ``spec``.

    ``spec`` is ``"package.module:factory"`` (any callable returning a gymnasium-API env,
    called with ``**kwargs``) or a gymnasium id such as ``"CartPole-v1"`` (made with
    ``gymnasium.make(spec, **kwargs)``; gymnasium's own ``"module:EnvId"`` form works too).
    Raises :class:`BenchError` with the reason when neither works (naming ``option``, the
    command-line option that gave ``spec``).
    """
    kwargs = dict(kwargs or {})
    if ":" in spec:
        return _from_module(spec, kwargs, option)
    gym = _gymnasium()
    if gym is None:
        raise BenchError(f"{option} {spec!r} looks like a gymnasium id, but gymnasium is not "
                         f"installed (pip install gymnasium); or pass package.module:factory, "
                         f"e.g. {__package__.rpartition('.')[0]}.envs:make_cartpole")
    fn = functools.partial(gym.make, spec, **kwargs)
    if spec not in gym.envs.registry:
        import difflib
        close = difflib.get_close_matches(spec, list(gym.envs.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BenchError(f"{option} {spec!r}: no such gymnasium env id{hint} (for your own "
                         f"env pass package.module:factory)")
    return fn


def _from_module(spec: str, kwargs: dict, option: str) -> Callable[[], Any]:
    """``"package.module:factory"``, or gymnasium's ``"module:EnvId"``."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise BenchError(f"{option} {spec!r}: cannot import module {mod_name!r} ({e}); use "
                         f"package.module:factory with the module on PYTHONPATH, or a "
                         f"gymnasium id such as CartPole-v1") from None
    obj: Any = mod
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        obj = None
    if callable(obj):
        return functools.partial(obj, **kwargs)
    gym = _gymnasium()  # gymnasium's own "module:EnvId": importing registered the id
    if gym is not None and attr in gym.envs.registry:
        return functools.partial(gym.make, spec, **kwargs)
    raise BenchError(f"{option} {spec!r}: module {mod_name!r} has no callable {attr!r} "
                     f"(and {attr!r} is not a registered gymnasium id)")


def checked_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """``--seconds`` and ``--env-kwargs`` as every benchmark command takes them: the env's
    keyword arguments, or a usage error (``parser.error``)."""
    if not (args.seconds > 0 and math.isfinite(args.seconds)):
        parser.error(f"--seconds must be a positive number, got {args.seconds}")
    if args.env_kwargs is None:
        return {}
    try:
        env_kwargs = json.loads(args.env_kwargs)
    except ValueError as e:
        parser.error(f"--env-kwargs is not valid JSON ({e}): {args.env_kwargs!r}")
    if not isinstance(env_kwargs, dict):
        parser.error(f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    return env_kwargs


def print_report(parser: argparse.ArgumentParser, as_json: bool,
                 table: Callable[[dict], str], measure: Callable[[Callable], dict]) -> int:
    """Run ``measure(progress)`` (progress lines go to stderr) and print its report on
    stdout, as JSON or as ``table(report)``; a BenchError is a usage error. Returns 0."""
    try:
        rep = measure(lambda msg: print(msg, file=sys.stderr, flush=True))
    except BenchError as e:
        parser.error(str(e))
    print(json.dumps(rep, indent=1) if as_json else table(rep))
    return 0


def _gymnasium():
    try:
        import gymnasium
    except ImportError:
        return None
    return gymnasium


def check_env(env_fn: Callable[[], Any], name: str, option: str = "--env") -> Any:
    """Build one env (closed again) and return its observation and action spaces (one
    sub-env's for a vector env)."""
    env = _make(env_fn, name, option)
    try:
        if is_vector(env):
            attrs, prefix = ("reset", "step", "single_action_space",
                             "single_observation_space"), "single_"
        else:
            attrs, prefix = ("reset", "step", "action_space", "observation_space"), ""
        for attr in attrs:
            if not hasattr(env, attr):
                raise BenchError(f"{option} {name!r} returned a {type(env).__name__}, which has "
                                 f"no {attr!r}: expected a gymnasium-API env")
        return getattr(env, prefix + "observation_space"), getattr(env, prefix + "action_space")
    finally:
        close_all([env])


def env_width(env_fn: Callable[[], Any], name: str, option: str = "--env") -> int:
    """Env steps per step of ``env_fn()``'s env: ``num_envs`` for a vector env, else 1
    (built and closed again; a vector env whose autoreset mode the sampler cannot honour
    is refused here)."""
    env = _make(env_fn, name, option)
    try:
        if is_vector(env):
            try:
                autoreset_mode(env, f"{option} {name!r}")
            except ValueError as e:
                raise BenchError(str(e)) from None
        return vector_width(env)
    finally:
        close_all([env])


def _make(env_fn: Callable[[], Any], name: str, option: str = "--env") -> Any:
    try:
        return env_fn()
    except Exception as e:
        raise BenchError(f"{option} {name!r}: making the env failed: {type(e).__name__}: {e}") \
            from None


def import_torch():
    """torch, or a :class:`BenchError` saying how to do without it."""
    try:
        import torch
    except ImportError:
        raise BenchError("the mlp agent needs torch, which is not installed: "
                         "pip install torch (or use --agent random)") from None
    return torch


def make_agent(name: str, spaces: tuple, seed: int = 0) -> Any:
    """``"random"`` (:class:`~sampling.RandomAgent`) or ``"mlp"``
    (:class:`~sampling.bench.MLPAgent`, needs torch)."""
    obs_space, act_space = spaces
    if name == "random":
        return RandomAgent(act_space, seed=seed)
    if name == "mlp":
        import_torch()
        from .mlp import MLPAgent
        return MLPAgent(obs_space, act_space, seed=seed)
    raise BenchError(f"unknown agent {name!r}; choose random or mlp")
