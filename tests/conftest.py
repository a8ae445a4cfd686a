"""Test setup: 8 fake CPU devices, so every multi-device path runs on a laptop or CI, and
implicit rank promotion is an error, so silent broadcasting fails loudly.

Compiled XLA executables are shared by every process of one test run (the xdist workers and the
commands tests start as users would) through JAX's persistent compilation cache in a folder made
for the run and removed after it: the same tiny models compile once per run, not once per
process. The cache is keyed by the computation, the devices and the flags, so a hit is the same
executable; tests that count traces still see every trace.
"""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backends (i.e. before any array is made).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Set once, by the first process of the run (xdist's controller); workers and subprocesses inherit
# it. A run started with its own JAX_COMPILATION_CACHE_DIR keeps that folder.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hubtune-tests-xla-")
# every executable, however small or quick to compile: the tests' models are tiny
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on the cache's file lock (the `filelock` package), so that a process never
# reads an entry another is still writing: without it the reader warns and compiles anyway.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_unconfigure(config):
    # the process that made the folder removes it (workers end before their controller)
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# Test files whose setups are the slowest (the demo's own run, the two-process launch, trained
# runs shared by a file's tests), slowest first. They start first, so that the two workers end
# together instead of one waiting for a late demo, and each goes whole to one worker
# (`--dist loadgroup`), so its module fixtures run once.
SLOW_SETUPS = (
    "test_demo.py",
    "test_launch.py",
    "test_soup_script.py",
    "test_cascade_script.py",
    "test_rank.py",
)
# Single tests that take the longest; they follow the groups, spread over both workers.
SLOW_TESTS = ("test_benchmarks_quick.py",)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(SLOW_SETUPS + SLOW_TESTS)}
    for item in items:
        if item.path.name in SLOW_SETUPS:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: file order kept
