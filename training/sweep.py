"""Hyper-parameter sweeps whose runs are the ingredients of a model soup.

A sweep is the Cartesian product of value lists for ``lr``, ``seed``, ``augmentation`` and
``label_smoothing`` over one base `RunConfig`. Each run writes its own folder, named after its
grid values, and every run shares the base's ``init_seed``, so all of them start from the same
parameters (head and SSF included) — "fine-tuned from one initialisation", as a soup needs. Every
run is planned (checked) before the first one trains; a sweep started again re-reads finished
runs, resumes the interrupted one, and refuses runs whose folders hold other settings. The sweep
folder's ``sweep.json`` lists each run's folder, swept values and final metrics.

References:
    Wortsman et al. "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time", ICML 2022. https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Mapping, Sequence

import jax

from training import run as run_lib
from training import run_folder as folder_lib
from training.config import RunConfig, RunError

SWEEP_FIELDS = ("lr", "seed", "augmentation", "label_smoothing")
_SHORT = {"lr": "lr", "seed": "seed", "augmentation": "aug", "label_smoothing": "ls"}


def run_name(values: Mapping[str, object]) -> str:
    """Folder name of a run from its grid values, e.g. ``lr=0.001_seed=0_aug=light_ls=0.1``."""
    return "_".join(f"{_SHORT[k]}={values[k]}" for k in SWEEP_FIELDS if k in values)


def expand_grid(base: RunConfig, grid: Mapping[str, Sequence]) -> list[RunConfig]:
    """One config per point of the grid, each writing to ``base.out_dir/<run_name>``.

    Args:
        base: the settings shared by all runs (its ``out_dir`` is the sweep's folder).
        grid: ``{field: [values]}`` for fields in :data:`SWEEP_FIELDS`; missing fields keep the
            base value.

    Returns:
        Configs in grid order (the last field varies fastest).

    Raises:
        RunError: a field outside :data:`SWEEP_FIELDS`, an empty value list, a repeated value
            (two runs would share a folder), or a value the run config rejects.
    """
    unknown = sorted(set(grid) - set(SWEEP_FIELDS))
    if unknown:
        raise RunError(f"sweep fields must be among {SWEEP_FIELDS}; got {unknown}")
    for field, values in grid.items():
        if len(values) == 0:
            raise RunError(f"sweep field {field!r} has no values")
        if len(set(values)) != len(values):
            raise RunError(f"sweep field {field!r} repeats a value: {list(values)}")
    fields = [f for f in SWEEP_FIELDS if f in grid]
    configs = []
    for point in itertools.product(*(grid[f] for f in fields)):
        values = dict(zip(fields, point, strict=True))
        out_dir = os.path.join(base.out_dir, run_name(values) or "run")
        configs.append(dataclasses.replace(base, out_dir=out_dir, **values))
    return configs


def run_sweep(
    configs: Sequence[RunConfig],
    grid: Mapping[str, Sequence],
    sweep_dir: str,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Plans every run (all checks first), then runs or re-reads each; writes ``sweep.json``.

    Args:
        configs: from `expand_grid`.
        grid: the swept values (recorded in ``sweep.json``).
        sweep_dir: the sweep's folder.
        progress: show progress bars.
        log: prints progress lines on process 0 (default `print`).

    Returns:
        The result dicts in order (the stored ones for finished runs).

    Raises:
        RunError, jaxmodels.data.sources.DataError, jaxmodels.ModelRefError: any run fails its checks;
            raised before anything trains.
    """
    log = log or print
    say = lambda text: log(text) if jax.process_index() == 0 else None
    plans = [run_lib.plan(config) for config in configs]
    entries = [
        {
            "folder": os.path.basename(p.config.out_dir),
            "values": {f: getattr(p.config, f) for f in grid},
        }
        for p in plans
    ]
    results = []
    for i, (plan, entry) in enumerate(zip(plans, entries, strict=True), 1):
        tag = f"[{i}/{len(plans)}] {entry['folder']}"
        if plan.finished:
            say(
                f"{tag}: finished before — {_accuracy_text(plan.stored_result)} (nothing retrained)"
            )
            result = plan.stored_result
        else:
            say(tag)
            result = run_lib.run(plan, progress=progress, log=log)
        results.append(result)
        entry.update(_summary(result))
        if jax.process_index() == 0:
            _write_sweep_json(sweep_dir, plans[0].config, grid, entries)
    say(format_table(entries))
    return results


def _summary(result: dict) -> dict:
    final = result.get("final_eval") or {}
    return {
        "finished": bool(result.get("finished")),
        "steps": result.get("steps"),
        "accuracy": final.get("accuracy"),
        "loss": final.get("loss"),
    }


def _accuracy_text(result: dict) -> str:
    accuracy = (result.get("final_eval") or {}).get("accuracy")
    return "no evaluation" if accuracy is None else f"accuracy {accuracy:.4f}"


def _write_sweep_json(sweep_dir: str, first: RunConfig, grid, entries) -> None:
    os.makedirs(sweep_dir, exist_ok=True)
    base = {k: v for k, v in run_lib._stored_config(first).items() if k not in grid}
    folder_lib.write_json(
        os.path.join(sweep_dir, folder_lib.SWEEP_JSON),
        {
            "format": "hubtune-sweep-v1",
            "swept": {k: list(v) for k, v in grid.items()},
            "base": run_lib._plain(base),
            "runs": run_lib._plain(entries),
        },
    )


def format_table(entries: Sequence[dict]) -> str:
    """The sweep's runs as a text table (swept values, accuracy), the best marked with ``*``."""
    fields = list(entries[0]["values"]) if entries else []
    scored = [e for e in entries if e.get("accuracy") is not None]
    best = max(scored, key=lambda e: e["accuracy"]) if scored else None
    header = ["", "run", *fields, "accuracy"]
    rows = [
        [
            "*" if e is best else "",
            e["folder"],
            *(str(e["values"][f]) for f in fields),
            "—" if e.get("accuracy") is None else f"{e['accuracy']:.4f}",
        ]
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    if best is not None:
        lines.append(f"* best: {best['folder']} (accuracy {best['accuracy']:.4f})")
    return "\n".join(lines)
