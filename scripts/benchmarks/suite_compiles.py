"""Where the test suite's XLA compile time goes: by test file, by program, by test.

The suite is compile-bound on CPU (docs/benchmarks.md, "The test suite"). This file is both a
pytest plugin that logs every compile of each test process, tagged with the running test, and
the report over those logs:

    rm -rf /tmp/suite-compiles
    PYTHONPATH=scripts/benchmarks python -m pytest -q -p no:cacheprovider -p suite_compiles
    python scripts/benchmarks/suite_compiles.py /tmp/suite-compiles [--top 20]

Only the pytest processes are logged (the xdist workers, or the one process without xdist);
processes a test starts (the demo, the two-process launch, the benchmark scripts) are not. A
compile is attributed to the test whose set-up last began in its process, module fixtures
included. The seconds are JAX's own "Finished XLA compilation" figures: backend compile only,
not tracing or lowering.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import pathlib
import re

LOG_DIR_ENV = "SUITE_COMPILES_DIR"
DEFAULT_DIR = "/tmp/suite-compiles"
_TEST = "TEST "
_COMPILE = re.compile(r"Finished XLA compilation of (.*) in ([0-9.eE+-]+) sec")


def pytest_configure(config):  # the plugin: one log per test process
    import jax

    folder = pathlib.Path(os.environ.get(LOG_DIR_ENV, DEFAULT_DIR))
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_log_compiles", True)
    handler = logging.FileHandler(folder / f"{os.getpid()}.log")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("jax").addHandler(handler)


def pytest_runtest_setup(item):
    logging.getLogger("jax").warning("%s%s", _TEST, item.nodeid)


def tally(lines) -> dict[str, collections.Counter]:
    """Compile seconds and counts by test file, program and test, from log lines."""
    seconds = {k: collections.Counter() for k in ("file", "program", "test")}
    counts = {k: collections.Counter() for k in ("file", "program", "test")}
    test = "(before the first test)"
    for line in lines:
        if line.startswith(_TEST):
            test = line[len(_TEST) :].strip()
            continue
        match = _COMPILE.search(line)
        if match:
            keys = {"file": test.split("::")[0], "program": match.group(1), "test": test}
            for kind, key in keys.items():
                seconds[kind][key] += float(match.group(2))
                counts[kind][key] += 1
    return {"seconds": seconds, "counts": counts}


def jax_own_names() -> set[str]:
    """Names of JAX's primitives and of the functions its numpy, lax and random modules define:
    a program of that name is one op called outside `jit`, compiled on its own."""
    import inspect
    import sys

    import jax.extend.core.primitives as primitives

    names = {p.name for p in vars(primitives).values() if hasattr(p, "bind") and hasattr(p, "name")}
    prefixes = ("jax._src.numpy", "jax._src.lax", "jax._src.random", "jax._src.prng")
    for module_name, module in list(sys.modules.items()):
        if module is not None and module_name.startswith(prefixes):
            for value in vars(module).values():
                function = inspect.unwrap(value) if callable(value) else None
                if inspect.isfunction(function) and function.__module__ == module_name:
                    names.add(function.__name__)
    return {name for name in names if not name.startswith("<")}  # lambdas are anyone's


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=DEFAULT_DIR, help="the plugin's log folder")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    args = parser.parse_args(argv)
    logs = sorted(pathlib.Path(args.folder).glob("*.log"))
    if not logs:
        parser.exit(2, f"suite_compiles: no *.log in {args.folder}; run pytest with the plugin\n")
    lines = [line for path in logs for line in path.read_text().splitlines()]
    found = tally(lines)
    total = sum(found["seconds"]["file"].values())
    number = sum(found["counts"]["file"].values())
    print(f"{number} compiles, {total:.1f} s, in {len(logs)} test processes")
    own = jax_own_names()
    single = [k for k in found["seconds"]["program"] if k.startswith("jit(") and k[4:-1] in own]
    print(
        f"single ops (JAX's own functions and primitives, called outside jit): "
        f"{sum(found['counts']['program'][k] for k in single)} compiles, "
        f"{sum(found['seconds']['program'][k] for k in single):.1f} s"
    )
    for kind in ("file", "program", "test"):
        print(f"\n| {kind} | compile s | compiles |\n| --- | ---: | ---: |")
        for key, value in found["seconds"][kind].most_common(args.top):
            print(f"| `{key}` | {value:.1f} | {found['counts'][kind][key]} |")


if __name__ == "__main__":
    main()
