"""Run a function three ways — as called, under `jax.jit`, and op by op — so tests cover both paths."""

import functools

import jax

MODES = ["eager_call", "under_jit", "disable_jit"]


def run(mode, fn, *args, **static):
    """Calls fn directly, wrapped in jax.jit (static kwargs closed over), or with jit disabled."""
    if mode == "under_jit":
        return jax.jit(functools.partial(fn, **static))(*args)
    if mode == "disable_jit":
        with jax.disable_jit():
            return fn(*args, **static)
    return fn(*args, **static)
