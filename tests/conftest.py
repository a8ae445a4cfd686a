"""Test setup: 8 fake CPU devices, so every multi-device path runs on a laptop or CI, and
implicit rank promotion is an error, so silent broadcasting fails loudly.

The suite is dominated by XLA compiles, and its two xdist workers and the command-line
processes it starts (the demo, the two-process launch) compile many of the same programs. They
share one persistent compilation cache, made fresh for each test run (nothing is carried from
an earlier run): a program compiled by one process is read back by the others. The programs are
compiled with XLA's default options, as users run them (docs/benchmarks.md says why a
faster-compiling build was rejected: it changed float results). Timings the tests print are not
figures; those come from the benchmark scripts run on their own (docs/benchmarks.md).
"""

import collections
import os
import shutil
import tempfile

# Must happen before JAX initialises its backends (i.e. before any array is made).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Made by the first process (the xdist controller, or a run without xdist) before it starts any
# other: the workers and their subprocesses inherit it through the environment. A cache the
# user set is used as it is, and kept.
_MADE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _MADE_CACHE = tempfile.mkdtemp(prefix="hubtune-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _MADE_CACHE
# Every compile is kept: most of the suite's are small, and reading one back is cheaper still.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionfinish(session):
    """The run's compilation cache goes with the run, removed by the process that made it."""
    if _MADE_CACHE is not None:
        shutil.rmtree(_MADE_CACHE, ignore_errors=True)


# The longest files first. The suite's wall time is its slower worker's, and xdist's own order
# (--dist loadfile: files by number of tests) put the files that start processes of their own,
# few tests and long, near the end: at 3f56d61 one worker ran the last 24 s alone. Measured wall
# times per file on 2 cores, docs/benchmarks.md ("Where a worker's time goes"); a stale list only
# costs balance. pyproject.toml's --no-loadscope-reorder makes xdist keep this order.
LONGEST_FILES = (
    "test_demo.py",  # its demo process, ~150 s
    "test_logme.py",
    "test_launch.py",  # two processes, ~100 s
    "test_soup_script.py",
    "test_committees.py",
    "test_rank.py",
    "test_stats.py",
    "test_train_step.py",
    "test_finetune.py",
    "test_benchmarks_quick.py",  # the scores benchmark's process, ~35 s
)


def pytest_collection_modifyitems(items):
    """Orders the files: `LONGEST_FILES` first, then the others by number of tests."""
    first = {name: i for i, name in enumerate(LONGEST_FILES)}
    counts = collections.Counter(item.path for item in items)
    # a stable sort: each file's tests keep their order
    items.sort(key=lambda item: (first.get(item.path.name, len(first)), -counts[item.path]))
