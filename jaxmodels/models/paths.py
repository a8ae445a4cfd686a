"""Parameter paths: nested variable dicts ⇄ flat ``{"params/layer1_0/conv1/kernel": leaf}`` dicts.

Checkpoint importers, training masks, SSF initialisation and soups all address leaves by their
path; this module is the one place that spells a path as a string (keys joined by ``/``, the
separator of Flax checkpoints and of big_vision's ``.npz`` files) and converts both ways.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

SEP = "/"


def key_name(key: Any) -> str:
    """The string name of one pytree path key (``DictKey``, ``GetAttrKey``, or a plain str)."""
    for attr in ("key", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any] | str) -> str:
    """``("params", "fc", "kernel")`` or key objects → ``"params/fc/kernel"`` (strings pass)."""
    if isinstance(path, str):
        return path
    return SEP.join(key_name(k) for k in path)


def flatten(tree: Mapping) -> dict[str, Any]:
    """Nested mapping → ``{path: leaf}`` with ``/``-joined string paths, in tree order.

    Args:
      tree: a nested mapping of arrays (Flax variables or one collection; FrozenDicts too).

    Returns:
      A flat dict; empty sub-dicts vanish (they hold no leaf).

    Raises:
      TypeError: ``tree`` is not a mapping.
    """
    if not isinstance(tree, Mapping):
        raise TypeError(f"expected a nested mapping of arrays; got {type(tree).__name__}")
    leaves = jax.tree_util.tree_flatten_with_path(dict(tree))[0]
    return {path_str(keys): leaf for keys, leaf in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of `flatten`: ``{"a/b/c": x}`` → ``{"a": {"b": {"c": x}}}`` (plain dicts)."""
    tree: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split(SEP)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} runs through the leaf {part!r}")
        node[name] = leaf
    return tree


def tree_digest(tree: Mapping) -> str:
    """SHA-256 of a variables tree: every leaf's path, dtype, shape and bytes, in path order.

    Two trees have the same digest exactly when they hold the same arrays at the same paths; a
    run records the digest of its starting variables, so soups can tell ingredients that started
    from one point.
    """
    digest = hashlib.sha256()
    for path, leaf in sorted(flatten(tree).items()):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{path}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
