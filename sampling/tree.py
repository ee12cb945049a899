"""Nested arrays: dicts and tuples of arrays (observations of Dict and Tuple spaces, infos).

Imports only numpy; torch is used only on tensors the user passes in. Every walk over
nested values in the package goes through these functions.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["is_tree", "tree_map", "tree_leaves", "get", "path_text", "to_numpy", "stack"]


def is_tree(x: Any) -> bool:
    """Dicts and tuples (observations of Dict and Tuple spaces) are trees; all else is a leaf."""
    return isinstance(x, (dict, tuple))


def tree_map(fn: Callable, tree: Any) -> Any:
    """Apply ``fn`` to every leaf of nested dicts/tuples (namedtuples keep their type)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        items = [tree_map(fn, v) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return fn(tree)


def tree_leaves(tree: Any, path: tuple = ()) -> Iterator[tuple]:
    """Yield ``(path, leaf)`` for every leaf, in order (tuple items by index)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from tree_leaves(v, path + (k,))
    elif isinstance(tree, tuple):
        for i, v in enumerate(tree):
            yield from tree_leaves(v, path + (i,))
    else:
        yield path, tree


def get(tree: Any, path: tuple, strict: bool = False) -> Any:
    """The value at ``path``. Raises ``LookupError`` where there is none; ``strict``: also
    where a step of the path is not a dict or tuple (a list or an array is not a tree of
    fields)."""
    for k in path:
        if strict and not is_tree(tree):
            raise LookupError(k)
        try:
            tree = tree[k]
        except (KeyError, IndexError, TypeError):
            raise LookupError(k) from None
    return tree


def path_text(path: tuple) -> str:
    """``('a', 0)`` as ``"['a'][0]"``, for messages."""
    return "".join(f"[{k!r}]" for k in path)


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view (CPU tensors, arrays) or copy (tensors elsewhere) of ``x``."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        return x.numpy()
    return np.asarray(x)


def stack(values: list) -> Any:
    """Stack a list of trees of the same structure into one tree of arrays."""
    if values and isinstance(values[0], dict):
        return {k: stack([v[k] for v in values]) for k in values[0]}
    if values and isinstance(values[0], tuple):
        return tuple(stack([v[i] for v in values]) for i in range(len(values[0])))
    return np.stack([np.asarray(v) for v in values])
