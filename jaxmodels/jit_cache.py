"""The one memo of compiled functions: built once per key, reused by every later call.

`jax.jit` caches per Python function object; functions built inside library calls (a model's
forward step, a train step, an initialiser) are new objects on every call, so without this memo
every call would trace and compile again. Keys hold what the compiled program depends on (the
module, its preprocessing, the mesh, option values), never the arrays it runs on.
"""

from collections.abc import Callable, Hashable

_CACHE: dict = {}


def cached(key: Hashable, build: Callable):
    """``build()`` the first time `key` is seen, the same object after that.

    A key that cannot be hashed (a module with unhashable fields) is built every time: still
    correct, only slower.
    """
    try:
        hash(key)
    except TypeError:
        return build()
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def size() -> int:
    """How many compiled functions are memoised (tests check that nothing new was built)."""
    return len(_CACHE)
