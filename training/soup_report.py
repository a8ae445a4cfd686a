"""Model soups from run folders, checked, evaluated and written: what ``scripts/soup.py`` runs.

Two steps, so that a user error costs nothing:

  * `plan` does every cheap check: the methods and options, the output folder, the runs (a
    sweep or run folders, read with ``load_run(weights=False)``: descriptions, no weights), that
    they can be averaged (``check_ingredients``: one architecture and base checkpoint; a warning
    naming the LP-FT recipe when their starting weights differ), the data and its labels.
  * `cook` reads each run's weights once, one run at a time (the ingredients are never all in
    memory, except for a learned soup, which needs them and checks its ``max_bytes`` first),
    predicts the held-out and test sets (decoded once by ``jaxmodels.prepare``), keeps the
    running sum of the logits for the ensemble of all runs, builds each soup from loaders
    (``training.greedy`` / ``uniform`` / ``learned``), optionally recomputes its BatchNorm
    statistics, evaluates it, and writes everything into a temporary folder renamed to ``out``
    at the very end: ``soup.json``, ``soup.png`` and one run folder per soup (``model/`` that
    ``jaxmodels.load`` reads, ``result.json`` and ``config.json`` that ``load_run`` reads).

References:
  Wortsman, Ilharco, Gadre, et al. "Model soups: averaging weights of multiple fine-tuned models
  improves accuracy without increasing inference time." ICML 2022 (Recipe 1: the greedy soup,
  ">=" on held-out accuracy). https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxmodels
from jaxmodels import preprocess, registry
from training import ingredients as ing
from training import run_folder, soup_plot, soups
from training.batch_stats import recompute_batch_stats
from training.run_config import RunError

METHODS = ("greedy", "uniform", "learned")
BN_MODES = ("average", "recompute")
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
      bn: ``"average"`` or ``"recompute"`` (BatchNorm statistics of each soup).
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
    bn: str = "average"
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
    bn: str = "average",
    bn_data: str | None = None,
    accept: str = ">=",
    learned_max_bytes: int | None = None,
    learned_by_layer: bool = False,
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
        (default: the held-out set); ``"average"`` keeps the averaged ones.
      bn_data: data spec for the recomputation.
      accept: the greedy acceptance rule.
      learned_max_bytes: default half of the accelerator's (else the host's) memory.
      learned_by_layer: per-tensor mixing weights for the learned soup.
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
    if bn_data is not None and bn != "recompute":
        raise SoupError("bn_data is only used with bn='recompute' (--bn recompute)")
    if accept not in soups.ACCEPT_RULES:
        raise SoupError(f"accept must be one of {soups.ACCEPT_RULES}; got {accept!r}")
    out = pathlib.Path(out).absolute()
    check_out(out)
    found = read_runs(runs)
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


def read_runs(paths: Sequence[str | os.PathLike]) -> list:
    """The runs of every sweep or run folder in ``paths``, without their weights.

    Raises:
      SoupError: no paths, the same run twice, or fewer than 2 runs.
      RunError: a folder that is no run or sweep, an empty sweep, an unfinished run.
    """
    if isinstance(paths, str | os.PathLike) or not paths:
        raise SoupError("give at least one sweep folder or two run folders (--runs)")
    found = []
    for path in paths:
        loaded = run_folder.load_run(path, weights=False)
        found.extend(loaded if isinstance(loaded, list) else [loaded])
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


def fix_mmap_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, threshold_bytes)``; True if it took effect.

    Why: glibc raises its mmap threshold each time a large block is freed, after which freed
    arrays stay in per-thread arenas instead of returning to the system, so a process streaming
    checkpoints (a soup) keeps the memory of earlier ones in its resident size. A fixed threshold
    gives every array above it its own mapping, unmapped when freed (the same as starting with
    ``MALLOC_MMAP_THRESHOLD_=1048576``). Call it at start-up, before large allocations; a no-op
    (False) where the C library is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold_bytes)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------ cooking


def cook(soup_plan: SoupPlan, *, progress: bool = True) -> dict:
    """Evaluates the runs, makes the soups and writes ``out`` (all or nothing).

    Returns:
      The content of ``soup.json``.

    Raises:
      SoupError: the learned soup's stack exceeds its ``max_bytes``; ``bn='recompute'`` for a
        model without BatchNorm. Nothing is left in ``out`` or beside it on any error.
    """
    out = soup_plan.out
    created = [d for d in reversed(out.parents) if not d.exists()]  # made here, undone on error
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 → what a plain mkdir would give
        report = _cook_into(soup_plan, tmp, progress)
        check_out(out)  # still free: nobody wrote there meanwhile
        if out.is_dir():
            out.rmdir()  # empty (checked): the rename needs the name
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in reversed(created):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise
    return report


def _cook_into(p: SoupPlan, folder: pathlib.Path, progress: bool) -> dict:
    runs, n = p.runs, len(p.runs)
    model, first = runs[0].load()
    if "learned" in p.methods:
        needed = n * ing.TreeLayout(first, p.names[0]).float32_bytes()
        if needed > p.learned_max_bytes:
            raise SoupError(
                f"a learned soup holds all {n} runs in memory: {needed / 1e6:.0f} MB in float32 "
                f"> the limit of {p.learned_max_bytes / 1e6:.0f} MB; raise --learned-max-mb, or "
                "use greedy/uniform (streamed)"
            )
    if p.bn == "recompute" and "batch_stats" not in first:
        raise SoupError(
            f"--bn recompute: {runs[0].info['name']} has no BatchNorm statistics to recompute"
        )
    prep = jaxmodels.spec_of(model).preprocessing
    sets = {"heldout": jaxmodels.prepare(p.heldout, prep, progress=progress)}
    if p.test is not None:
        sets["test"] = jaxmodels.prepare(p.test, prep, progress=progress)

    # every run once, one at a time: its scores, and its logits into the ensemble's sum
    rows, logit_sums = [], {}
    for i in tqdm(range(n), desc="runs", unit="run", disable=not progress, leave=False):
        run_model, variables = (model, first) if i == 0 else runs[i].load()
        first = None  # the loop holds one run's weights at a time
        if run_model != model:
            raise SoupError(f"run {p.names[i]} rebuilds another model than {p.names[0]}")
        row = {"name": p.names[i], "folder": str(runs[i].folder)}
        for split, prepared in sets.items():
            logits_NK = jaxmodels.predict(model, variables, prepared, progress=False)
            row[split] = jaxmodels.evaluate_logits(logits_NK, prepared.labels)._asdict()
            total = logit_sums.get(split)
            logits64 = logits_NK.astype(np.float64)
            logit_sums[split] = logits64 if total is None else total + logits64
        rows.append(row)
        del variables
    ensemble = {"members": n, "inference_cost": n}
    for split, prepared in sets.items():
        ensemble[split] = jaxmodels.evaluate_logits(logit_sums[split] / n, prepared.labels)
        ensemble[split] = ensemble[split]._asdict()
    best = max(range(n), key=lambda i: rows[i]["heldout"]["accuracy"])  # first of ties

    finish = _bn_finisher(p, model, prep)
    loaders = [lambda run=run: run.load()[1] for run in runs]
    made = {}
    for method in p.methods:
        soup, details = _make(method, p, model, prep, loaders, rows, sets, finish)
        evals = {s: jaxmodels.evaluate(model, soup, d)._asdict() for s, d in sets.items()}
        made[method] = {**details, **evals, "folder": method}
        _write_soup_folder(folder / method, p, model, soup, method, made[method])
        del soup

    report = {
        "format": "hubtune-soup-v1",
        "heldout_data": p.heldout.spec,
        "test_data": None if p.test is None else p.test.spec,
        "bn": p.bn,
        "bn_data": None if p.bn_data is None else p.bn_data.spec,
        "accept": p.accept,
        "ingredients": rows,
        "best_single": {"name": rows[best]["name"], "index": best},
        "ensemble": ensemble,
        "soups": made,
        "warnings": list(p.warnings),
    }
    run_folder.write_json(folder / SOUP_JSON, report)
    soup_plot.plot_soup(report, folder / SOUP_PNG)
    return report


def _image_batches(prepared) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(uint8 images [b, S, S, 3], labels [b])`` per batch of a prepared set, real rows only
    (single process)."""
    if prepared.on_host:
        return [(b.images[b.valid], b.labels[b.valid]) for b in prepared.host_batches()]
    images, valid = np.asarray(prepared.images), np.asarray(prepared.valid)
    labels = np.asarray(prepared.labels_TB)
    return [(x[ok], y[ok]) for x, y, ok in zip(images, labels, valid, strict=True) if ok.any()]


def _bn_finisher(p: SoupPlan, model, prep) -> Callable[[dict], dict]:
    """The identity, or: recompute the BatchNorm statistics on the BatchNorm data."""
    if p.bn != "recompute":
        return lambda variables: variables
    source = p.bn_data if p.bn_data is not None else p.heldout
    batches = _image_batches(jaxmodels.prepare(source, prep, progress=False))

    def finish(variables):
        floats = (preprocess.normalize(images, prep) for images, _ in batches)
        return recompute_batch_stats(model, variables, floats)

    return finish


def _make(method, p: SoupPlan, model, prep, loaders, rows, sets, finish):
    """One soup and what to record of how it was made."""
    n = len(loaders)
    if method == "uniform":
        soup = finish(soups.uniform(loaders))
        return soup, {"members": list(p.names), "weights": [1.0 / n] * n}
    if method == "greedy":
        heldout = sets["heldout"]
        evaluate = lambda v: jaxmodels.evaluate(model, finish(v), heldout).accuracy
        scores = [row["heldout"]["accuracy"] for row in rows]
        soup, report = soups.greedy(loaders, evaluate, accept=p.accept, scores=scores)
        if len(report.accepted) > 1:  # a single member keeps its own statistics
            soup = finish(soup)
        members = [p.names[i] for i in report.accepted]
        return soup, {
            "members": members,
            "weights": [1.0 / len(members)] * len(members),
            "report": {**report._asdict(), "order_names": [p.names[i] for i in report.order]},
        }

    def loss_fn(variables, batch):
        images, labels = batch
        x = preprocess.normalize(images, prep)
        if p.bn == "recompute":  # BatchNorm on the batch's own statistics, as the soup will be
            logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(variables, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    batches = _image_batches(sets["heldout"])
    soup, report = soups.learned(
        loaders, loss_fn, batches, max_bytes=p.learned_max_bytes, by_layer=p.learned_by_layer
    )
    details = {"members": list(p.names), "report": report._asdict()}
    if not p.learned_by_layer:
        details["weights"] = list(report.weights)
    return finish(soup), details


def _write_soup_folder(folder: pathlib.Path, p: SoupPlan, model, soup, method, made) -> None:
    """A run folder for one soup: ``model/`` (``jaxmodels.load``), ``result.json`` and
    ``config.json`` (``load_run``; the first run's config, ``out_dir`` '.')."""
    first = p.runs[0]
    starts = {run.info.get("start_sha256") for run in p.runs}
    evals = [
        {"split": split, "data": source.spec, **made[split]}
        for split, source in (("heldout", p.heldout), ("test", p.test))
        if split in made
    ]
    summary = {k: v for k, v in made.items() if k in ("members", "weights")}
    info = {
        "kind": "soup",
        "method": method,
        "bn": p.bn,
        "ingredients": list(p.names),
        **summary,
        **{f"{e['split']}_accuracy": e["accuracy"] for e in evals},
        "base_checkpoint_sha256": first.info.get("base_checkpoint_sha256"),
        "start_sha256": starts.pop() if len(starts) == 1 else None,
        "train_data": first.info.get("train_data"),
        "eval_data": p.heldout.spec,
    }
    folder.mkdir()
    name = first.info["name"]
    overrides = registry.overrides_of(name, model)
    jaxmodels.save(
        folder / run_folder.MODEL_DIR, name, jax.device_get(soup), info=info, **overrides
    )
    config = {**first.result["config"], "out_dir": "."}
    result = {
        "config": config,
        "finished": True,
        "kind": "soup",
        "method": method,
        "ingredients": [str(run.folder) for run in p.runs],
        **summary,
        "num_classes": first.info["num_classes"],
        "final_eval": evals[-1],
        "evals": evals,
        "model_dir": run_folder.MODEL_DIR,
    }
    run_folder.write_json(folder / run_folder.CONFIG_JSON, config)
    run_folder.write_json(folder / run_folder.RESULT_JSON, result)


# ------------------------------------------------------------------ the table


def format_table(report: dict) -> str:
    """The runs, the best of them, each soup and the ensemble, with accuracy and inference cost."""
    splits = ["heldout"] + (["test"] if report["test_data"] else [])
    n = len(report["ingredients"])
    lines = []

    def line(label, entry, cost):
        cells = "".join(f"{entry[s]['accuracy']:>10.4f}" for s in splits)
        lines.append(f"{label:<34}{cells}{cost:>8}")

    header = "".join(f"{s.replace('heldout', 'held-out'):>10}" for s in splits)
    lines.append(f"{'model (accuracy)':<34}{header}{'cost':>8}")
    for row in report["ingredients"]:
        line(f"  {row['name']}", row, "1x")
    best = report["ingredients"][report["best_single"]["index"]]
    line(f"best single run ({best['name']})", best, "1x")
    for method, soup in report["soups"].items():
        line(f"{method} soup ({len(soup['members'])} of {n} runs)", soup, "1x")
    line(f"ensemble of all {n} runs (logits)", report["ensemble"], f"{n}x")
    return "\n".join(lines)
