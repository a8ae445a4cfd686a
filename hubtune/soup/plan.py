"""Model soups from run folders, step 1: every cheap check, before any weights are read.

`plan` checks the methods and options, the output folder (results are never written over), the
runs (a sweep or run folders, read with ``load_run(weights=False)``: descriptions, no weights),
that they can be averaged (``check_ingredients``: one architecture and base checkpoint; a warning
naming the LP-FT recipe when their starting weights differ), and the data and its labels. A
problem is a `SoupError`: one line, naming it. ``hubtune.soup.cook.cook`` then makes the soups.

References:
  Wortsman, Ilharco, Gadre, et al. "Model soups: averaging weights of multiple fine-tuned models
  improves accuracy without increasing inference time." ICML 2022.
  https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import warnings
from collections.abc import Sequence

import jax
import numpy as np

import jaxmodels
from training import run_folder
from training.config import RunError
from training.soups import averaging as soups
from training.soups import ingredients as ing

MERGES = ("task-arithmetic", "ties", "dare")
METHODS = ("greedy", "uniform", "learned", "wise-ft", *MERGES)
BN_MODES = ("auto", "average", "recompute")
SOUP_JSON, SOUP_PNG = "soup.json", "soup.png"


class SoupError(RunError):
    """A user error about a soup — its runs, data, options or output folder — in one line."""


@dataclasses.dataclass(frozen=True)
class SoupPlan:
    """A soup whose cheap checks have passed (`plan`); `cook` makes it.

    Attributes:
      runs: the ingredients (``Run`` descriptions without weights), in the order given.
      names: a short, unique label per run (its folder name; with its parent when two collide).
      heldout, test, bn_data: the data sources (``test`` and ``bn_data`` may be None).
      methods: soups to make, from ``METHODS``.
      out: the output folder (absent or empty now).
      bn: ``"auto"``, ``"average"`` or ``"recompute"`` (BatchNorm statistics of each soup;
        `cook` resolves ``"auto"``).
      accept: the greedy rule, ``">="`` (the paper's) or ``">"``.
      learned_max_bytes: the largest float32 stack of all ingredients a learned soup may hold.
      learned_by_layer: one mixing vector per parameter tensor.
      warnings: messages for the user (e.g. the LP-FT warning), already run-named.
    """

    runs: tuple
    names: tuple[str, ...]
    heldout: jaxmodels.ImageSource
    test: jaxmodels.ImageSource | None
    bn_data: jaxmodels.ImageSource | None
    methods: tuple[str, ...]
    out: pathlib.Path
    bn: str = "auto"
    accept: str = ">="
    learned_max_bytes: int = 0
    learned_by_layer: bool = False
    warnings: tuple[str, ...] = ()


def plan(
    runs: Sequence[str | os.PathLike],
    heldout: str,
    *,
    out: str | os.PathLike,
    test: str | None = None,
    methods: Sequence[str] = ("greedy", "uniform"),
    bn: str = "auto",
    bn_data: str | None = None,
    accept: str = ">=",
    learned_max_bytes: int | None = None,
    learned_by_layer: bool = False,
    trajectory: bool = False,
    data_dir: str | None = None,
) -> SoupPlan:
    """Checks a soup before any weights are read (module docstring).

    Args:
      runs: sweep folders (with ``sweep.json``) and/or run folders; together at least 2 runs.
      heldout: data spec of the held-out set (greedy selection, learned weights, the plot).
      out: output folder; must not exist or be empty.
      test: data spec of the test set every model is reported on (optional).
      methods: among ``METHODS``.
      bn: ``"recompute"`` re-estimates each soup's BatchNorm statistics on ``bn_data``
        (default: the held-out set); ``"average"`` keeps the averaged ones; ``"auto"`` (the
        default) recomputes whenever the runs have BatchNorm statistics.
      bn_data: data spec for the recomputation.
      accept: the greedy acceptance rule.
      learned_max_bytes: default half of the accelerator's (else the host's) memory.
      learned_by_layer: per-tensor mixing weights for the learned soup.
      trajectory: each run folder stands for the checkpoints it kept (`training.trajectory`).
      data_dir: TFDS data directory.

    Returns:
      A `SoupPlan`.

    Raises:
      SoupError, training.RunError, jaxmodels.DataError: one line, naming the problem.
    """
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise SoupError(f"methods must be distinct names among {', '.join(METHODS)}; got {methods}")
    if bn not in BN_MODES:
        raise SoupError(f"bn must be one of {', '.join(BN_MODES)}; got {bn!r}")
    if bn_data is not None and bn == "average":
        raise SoupError("bn_data is only used to recompute statistics, not with bn='average'")
    if accept not in soups.ACCEPT_RULES:
        raise SoupError(f"accept must be one of {soups.ACCEPT_RULES}; got {accept!r}")
    out = pathlib.Path(out).absolute()
    check_out(out)
    found = read_runs(runs, trajectory=trajectory)
    names = short_names([run.folder for run in found])
    caught = check_runs(found, names)
    max_bytes = default_max_bytes() if learned_max_bytes is None else learned_max_bytes
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise SoupError(f"learned_max_bytes must be a positive int; got {max_bytes!r}")
    classes = found[0].info["num_classes"]
    sources = {}
    for role, spec in (("held-out", heldout), ("test", test), ("BatchNorm", bn_data)):
        sources[role] = None if spec is None else open_labelled(spec, role, classes, data_dir)
    if (
        sources["test"] is not None
        and sources["test"].fingerprint == sources["held-out"].fingerprint
    ):
        caught += (
            "the held-out and test data are the same: the greedy soup was chosen on it, so its "
            "test accuracy is optimistic; give --test data held out from the selection",
        )
    return SoupPlan(
        runs=tuple(found),
        names=names,
        heldout=sources["held-out"],
        test=sources["test"],
        bn_data=sources["BatchNorm"],
        methods=methods,
        out=out,
        bn=bn,
        accept=accept,
        learned_max_bytes=max_bytes,
        learned_by_layer=bool(learned_by_layer),
        warnings=caught,
    )


def check_out(out: pathlib.Path) -> None:
    """Refuses an output folder that is a file or already holds anything (results are never
    overwritten)."""
    if out.exists() and not out.is_dir():
        raise SoupError(f"--out {str(out)!r} is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise SoupError(
            f"--out {str(out)!r} already holds results ({held}); give a new folder (soups are "
            "never written over earlier results)"
        )


def read_runs(paths: Sequence[str | os.PathLike], trajectory: bool = False) -> list:
    """The runs of every sweep or run folder in ``paths``, without their weights (with
    `trajectory`, each run's kept checkpoints instead).

    Raises:
      SoupError: no paths, the same run twice, or fewer than 2 runs.
      RunError: a folder that is no run or sweep, an empty sweep, an unfinished run.
    """
    if isinstance(paths, str | os.PathLike) or not paths:
        raise SoupError("give at least one sweep folder or two run folders (--runs)")
    found = []
    for path in paths:
        loaded = run_folder.load_run(path, weights=False)
        for run in loaded if isinstance(loaded, list) else [loaded]:
            found.extend(run_folder.trajectory(run.folder) if trajectory else [run])
    seen: dict[pathlib.Path, int] = {}
    for i, run in enumerate(found):
        key = run.folder.resolve()
        if key in seen:
            raise SoupError(f"run {str(run.folder)!r} is given twice (runs {seen[key]} and {i})")
        seen[key] = i
    if len(found) < 2:
        raise SoupError(f"a soup needs at least 2 finished runs; got {len(found)}")
    return found


def short_names(folders: Sequence[pathlib.Path]) -> tuple[str, ...]:
    """Folder names, widened with their parents where two would collide (labels, not paths)."""
    parts = [pathlib.Path(f).absolute().parts for f in folders]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return tuple(names)
        depth = [d + 1 if n in clashes else d for n, d in zip(names, depth, strict=True)]


def check_runs(runs: Sequence, names: Sequence[str]) -> tuple[str, ...]:
    """Checks that the runs can be averaged; returns the warnings, with run names.

    Raises:
      SoupError: different classes or image sizes, or what ``check_ingredients`` refuses
        (different architectures or base checkpoints, missing descriptions).
    """
    first = runs[0].info
    for i, run in enumerate(runs[1:], start=1):
        for key, what in (("num_classes", "classes"), ("image_size", "image sizes")):
            if run.info.get(key) != first.get(key):
                raise SoupError(
                    f"runs {names[0]} and {names[i]} have different {what} ({first.get(key)} vs "
                    f"{run.info.get(key)}); a soup averages one model fine-tuned several times"
                )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ing.check_ingredients([run.info for run in runs])
        except ValueError as err:
            text = re.sub(r" \(pass allow_mixed=True[^)]*\)", "", str(err))
            raise SoupError(_with_run_names(text, names)) from None
    return tuple(_with_run_names(str(w.message), names) for w in caught)


def _with_run_names(text: str, names: Sequence[str]) -> str:
    """``check_ingredients``' "ingredients 0 and 2" / "ingredient 1" / "infos[1]" → run names."""
    text = re.sub(
        r"ingredients (\d+) and (\d+)",
        lambda m: f"runs {names[int(m[1])]} and {names[int(m[2])]}",
        text,
    )
    return re.sub(
        r"ingredient (\d+)|infos\[(\d+)\]", lambda m: f"run {names[int(m[1] or m[2])]}", text
    )


def open_labelled(spec: str, role: str, num_classes: int, data_dir: str | None):
    """The source of ``spec``, checked: labelled, non-empty, labels within the runs' classes."""
    source = jaxmodels.open_source(spec, split="test", data_dir=data_dir)
    if len(source) == 0:
        raise SoupError(f"{role} data {spec!r} holds no examples")
    if (np.asarray(source.labels) < 0).any():
        raise SoupError(f"{role} data {spec!r} has unlabelled examples; it must be labelled")
    jaxmodels.check_classes_within(source, num_classes, role)
    return source


def default_max_bytes() -> int:
    """Half of the first device's memory when it reports it (accelerators), else of the host's."""
    try:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # backends without memory statistics
        limit = None
    if not limit:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(limit) // 2
