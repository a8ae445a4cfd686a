"""The ``hubtune`` command: one entry point for the four steps of the workflow and the demo.

    hubtune rank  --models ... --data ... --out DIR     # Select (LogME and its peers)
    hubtune tune  --model ... --data ... --out DIR      # Tune (SSF, full, linear, BitFit)
    hubtune soup  --runs ... --heldout ... --out DIR    # Combine (model soups, merges)
    hubtune serve --models ... --heldout ... --out DIR  # Serve (ensembles and cascades)
    hubtune demo  --quick                               # all four on scikit-learn's digits

``hubtune STEP --help`` prints the step's own options. Each step is the same program as
``python scripts/STEP.py`` in a checkout (``finetune.py`` for tune, ``cascade.py`` for serve).
"""

from __future__ import annotations

import importlib
import sys

# step -> (module with main(argv) -> int, one line for --help). Imported only when chosen, so
# `hubtune --help` answers without loading JAX.
STEPS = {
    "rank": (
        "hubtune.rank",
        "Select: score a hub's models for a task without fine-tuning (LogME, LEEP, ...).",
    ),
    "tune": (
        "hubtune.tune",
        "Tune: fine-tune a model (SSF, full, linear probe, BitFit), one run or a sweep.",
    ),
    "soup": (
        "hubtune.soup.cli",
        "Combine: average fine-tuned runs into uniform, greedy or learned soups.",
    ),
    "serve": (
        "hubtune.serve.cli",
        "Serve: fit a cascade or an ensemble of models, measured against the best one.",
    ),
    "demo": (
        "hubtune.demo.workflow",
        "All four steps on scikit-learn's digits, offline, with a report.",
    ),
}


def usage() -> str:
    width = max(map(len, STEPS))
    lines = [
        __doc__.split("\n\n")[0],
        "",
        "usage: hubtune STEP [options]   (hubtune STEP --help)",
        "",
        "steps:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in STEPS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs ``hubtune STEP ARGS...``; returns the step's exit status (2 for a usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    step, rest = argv[0], argv[1:]
    if step not in STEPS:
        print(
            f"hubtune: error: unknown step {step!r}; choose from {', '.join(STEPS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(STEPS[step][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
