"""Model soups from run folders, the output: one run folder per soup, the table, the staging.

A soup is written as a run folder that the rest of hubtune reads like any fine-tuned run:
``model/`` for ``jaxmodels.load`` and ``result.json`` + ``config.json`` for
``training.load_run``, its ``model/model.json`` saying what it is (``kind: soup``, the method,
the members). `staged` makes the output folder all or nothing: everything is written into a
temporary sibling renamed to the output at the very end.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile

import jax

import jaxmodels
from hubtune.soup.plan import SoupPlan, check_out
from jaxmodels.models import registry
from training import run_folder

SOUP_JSON, SOUP_PNG = "soup.json", "soup.png"


@contextlib.contextmanager
def staged(out: pathlib.Path):
    """Yields a new temporary folder beside ``out``, renamed to ``out`` when the block succeeds.

    On any error (a user error, Ctrl-C) the temporary folder and any parent folders made here
    are removed: nothing is left half-written. ``out`` is checked again just before the rename,
    so a result another process wrote meanwhile is never replaced.
    """
    created = [d for d in reversed(out.parents) if not d.exists()]  # made here, undone on error
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 → what a plain mkdir would give
        yield tmp
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


def write_soup_folder(folder: pathlib.Path, p: SoupPlan, model, soup, method, made) -> None:
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
