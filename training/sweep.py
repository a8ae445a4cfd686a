"""Hyper-parameter sweeps whose runs are the ingredients of a model soup.

A sweep is the Cartesian product of value lists for ``lr``, ``seed``, ``augmentation`` and
``label_smoothing`` over one base :class:`training.run.RunConfig`. Each run writes its own
directory (one checkpoint and one ``result.json``), named after its grid values, so a sweep
that is started again skips finished runs and resumes the interrupted one.

References:
    Wortsman et al. "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time", ICML 2022. https://arxiv.org/abs/2203.05482
"""

import dataclasses
import itertools
import json
import os
from collections.abc import Mapping, Sequence

from training import run as run_lib

SWEEP_FIELDS = ("lr", "seed", "augmentation", "label_smoothing")
_SHORT = {"lr": "lr", "seed": "seed", "augmentation": "aug", "label_smoothing": "ls"}


def run_name(values: Mapping[str, object]) -> str:
    """Directory name of a run from its grid values, e.g. ``lr=0.001_seed=0_aug=light_ls=0.1``."""
    return "_".join(f"{_SHORT[k]}={values[k]}" for k in SWEEP_FIELDS if k in values)


def expand_grid(base: run_lib.RunConfig, grid: Mapping[str, Sequence]) -> list[run_lib.RunConfig]:
    """One config per point of the grid, each writing to ``base.out_dir/<run_name>``.

    Args:
        base: the settings shared by all runs (its ``out_dir`` is the sweep's directory).
        grid: ``{field: [values]}`` for fields in :data:`SWEEP_FIELDS`; missing fields keep the
            base value.

    Returns:
        Configs in grid order (the last field varies fastest).

    Raises:
        ValueError: a field outside :data:`SWEEP_FIELDS`, an empty value list, or a repeated
            value (two runs would share a directory).
    """
    unknown = sorted(set(grid) - set(SWEEP_FIELDS))
    if unknown:
        raise ValueError(f"sweep fields must be among {SWEEP_FIELDS}; got {unknown}")
    for field, values in grid.items():
        if len(values) == 0:
            raise ValueError(f"sweep field {field!r} has no values")
        if len(set(values)) != len(values):
            raise ValueError(f"sweep field {field!r} repeats a value: {list(values)}")
    fields = [f for f in SWEEP_FIELDS if f in grid]
    configs = []
    for point in itertools.product(*(grid[f] for f in fields)):
        values = dict(zip(fields, point, strict=True))
        out_dir = os.path.join(base.out_dir, run_name(values) or "run")
        configs.append(dataclasses.replace(base, out_dir=out_dir, **values))
    return configs


def run_sweep(configs: Sequence[run_lib.RunConfig], progress: bool = True) -> list[dict]:
    """Runs each config in turn, skipping those whose ``result.json`` says finished.

    Returns:
        The result dicts in order (read back from disk for skipped runs).
    """
    results = []
    for i, config in enumerate(configs):
        result_path = os.path.join(config.out_dir, "result.json")
        if os.path.exists(result_path):
            with open(result_path) as f:
                previous = json.load(f)
            if previous.get("finished"):
                print(f"[{i + 1}/{len(configs)}] {config.out_dir}: finished before, skipped")
                results.append(previous)
                continue
        print(f"[{i + 1}/{len(configs)}] {config.out_dir}")
        results.append(run_lib.run(config, progress=progress))
    return results
