"""Model soups from run folders, step 2: evaluate the runs, make the soups, write the results.

`cook` reads each run's weights once, one run at a time (the ingredients are never all in memory,
except for a learned soup, which needs them and checks its ``max_bytes`` first), predicts the
held-out and test sets (decoded once by ``jaxmodels.prepare``), keeps the running sum of the
logits for the ensemble of all runs, builds each soup from loaders (``training.soups.averaging.greedy`` /
``uniform`` / ``learned``), optionally recomputes its BatchNorm statistics, evaluates it, and
writes the results through ``hubtune.soup.output`` (all or nothing).

References:
  Wortsman, Ilharco, Gadre, et al. "Model soups: averaging weights of multiple fine-tuned models
  improves accuracy without increasing inference time." ICML 2022 (Recipe 1: the greedy soup,
  ">=" on held-out accuracy; the learned soup). https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxmodels
from hubtune.soup import output as soup_output
from hubtune.soup import plot as soup_plot
from hubtune.soup.plan import MERGES, SoupError, SoupPlan
from jaxmodels.data import preprocess
from jaxmodels.models.paths import tree_digest
from training import run_folder
from training.soups import averaging as soups
from training.soups import ingredients as ing
from training.soups import merges
from training.soups.batch_stats import recompute_batch_stats


def cook(soup_plan: SoupPlan, *, progress: bool = True) -> dict:
    """Evaluates the runs, makes the soups and writes ``out`` (all or nothing).

    Returns:
      The content of ``soup.json``.

    Raises:
      SoupError: the learned soup's stack exceeds its ``max_bytes``; ``bn='recompute'`` for a
        model without BatchNorm. Nothing is left in ``out`` or beside it on any error.
    """
    with soup_output.staged(soup_plan.out) as folder:
        return _cook_into(soup_plan, folder, progress)


def _cook_into(p: SoupPlan, folder: pathlib.Path, progress: bool) -> dict:
    runs, n = p.runs, len(p.runs)
    model, first = _load(runs[0], p.names[0])
    if p.bn == "auto":  # averaged running statistics describe no model: recompute what exists
        p = dataclasses.replace(p, bn="recompute" if "batch_stats" in first else "average")
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
    for i in tqdm(range(n), desc="runs", unit="run", disable=not progress, leave=False, delay=2.0):
        run_model, variables = (model, first) if i == 0 else _load(runs[i], p.names[i])
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
    loaders = [
        lambda run=run, name=name: _load(run, name)[1]
        for run, name in zip(runs, p.names, strict=True)
    ]
    made = {}
    for method in p.methods:
        soup, details = _make(method, p, model, prep, loaders, rows, sets, finish)
        evals = {s: jaxmodels.evaluate(model, soup, d)._asdict() for s, d in sets.items()}
        made[method] = {**details, **evals, "folder": method}
        soup_output.write_soup_folder(folder / method, p, model, soup, method, made[method])
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
    run_folder.write_json(folder / soup_output.SOUP_JSON, report)
    soup_plot.plot_soup(report, folder / soup_output.SOUP_PNG)
    return report


def _load(run, name: str):
    """(model, variables) of one run; unreadable weights are a one-line `SoupError`."""
    try:
        return run.load()
    except ValueError as err:  # a damaged or truncated checkpoint (jaxmodels.load)
        raise SoupError(f"run {name}: {err}") from None


def _start_of(p: SoupPlan, model, method: str):
    """The runs' common starting weights, rebuilt from the first run's model reference."""
    config = p.runs[0].config
    built = jaxmodels.build(
        config.model, num_classes=p.runs[0].info["num_classes"], init_seed=config.init_seed,
        image_size=config.image_size,
    )  # fmt: skip
    if built.model != model:
        raise SoupError(f"{method}: the runs' start {config.model!r} rebuilds another model")
    # an SSF run's start also held the SSF parameters (near the identity): folded, they vanish
    if config.mode != "ssf" and tree_digest(built.variables) != p.runs[0].info.get("start_sha256"):
        raise SoupError(
            f"{method}: {config.model!r} no longer holds the weights the runs began from"
        )
    return jax.device_get(built.variables)


def _heldout_scorer(model, sets, finish) -> Callable[[dict], float]:
    """Held-out accuracy of variables as their soup will be (statistics finished first)."""
    return lambda variables: jaxmodels.evaluate(model, finish(variables), sets["heldout"]).accuracy


def _swept(start, end, model, sets, finish, members: list, **settings):
    """The held-out-best point of start → end (α in 0, 0.1, …, 1) and what to record of it:
    the members, α and the held-out curve."""
    soup, sweep = merges.sweep_interpolation(start, end, _heldout_scorer(model, sets, finish))
    details = {
        "members": members,
        "alpha": sweep.best_alpha,
        "curve": {"alphas": list(sweep.alphas), "heldout_accuracy": list(sweep.scores)},
        **settings,
    }
    return finish(soup), details


def _wise_ft(p: SoupPlan, model, loaders, rows, sets, finish):
    """WiSE-FT (Wortsman et al., CVPR 2022): the runs' start and the best run, interpolated
    with the held-out-best α of 0, 0.1, …, 1 (statistics recomputed per α under --bn recompute)."""
    best = max(range(len(rows)), key=lambda i: rows[i]["heldout"]["accuracy"])
    start = _start_of(p, model, "wise-ft")
    return _swept(start, loaders[best], model, sets, finish, [p.names[best]])


# TIES keeps the top 20 % of each task vector, DARE drops 90 % of its entries: the papers'.
TIES_DENSITY, DARE_DROP, DARE_SEED = 0.2, 0.9, 0


def _merge(method: str, p: SoupPlan, model, loaders, sets, finish):
    """Task arithmetic, TIES-merging or DARE of every run's task vector into the runs' start.

    Each merge is ``start + λ·τ`` with τ the method's merged task vector (`training.soups.merges`:
    ``params`` only, the start's BatchNorm statistics kept, recomputed under --bn recompute), so
    τ is made once, at λ = 1, and λ in 0, 0.1, …, 1 is chosen on held-out data as WiSE-FT's α
    is (the same interpolation).
    """
    start = _start_of(p, model, method)
    if method == "task-arithmetic":
        merged, settings = merges.task_arithmetic(start, loaders, 1.0), {}
    elif method == "ties":
        merged = merges.ties(start, loaders, density=TIES_DENSITY, scale=1.0)
        settings = {"density": TIES_DENSITY}
    else:
        merged = merges.dare(start, loaders, drop=DARE_DROP, seed=DARE_SEED, scale=1.0)
        settings = {"drop": DARE_DROP, "seed": DARE_SEED}
    return _swept(start, merged, model, sets, finish, list(p.names), **settings)  # α is λ


def _image_batches(prepared) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(uint8 images [b, S, S, 3], labels [b])`` per batch of a prepared set, real rows only."""
    images_N, labels_N, size = prepared.host_images(), prepared.labels, prepared.batch_size
    return [(images_N[i : i + size], labels_N[i : i + size]) for i in range(0, len(images_N), size)]


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
        evaluate = _heldout_scorer(model, sets, finish)
        if p.bn == "recompute":  # one yardstick: each run judged as its soups are, recomputed
            scores = [evaluate(load()) for load in loaders]
        else:
            scores = [row["heldout"]["accuracy"] for row in rows]
        soup, report = soups.greedy(loaders, evaluate, accept=p.accept, scores=scores)
        soup = finish(soup)  # what was scored, a single member included
        members = [p.names[i] for i in report.accepted]
        return soup, {
            "members": members,
            "weights": [1.0 / len(members)] * len(members),
            "report": {**report._asdict(), "order_names": [p.names[i] for i in report.order]},
        }

    if method == "wise-ft":
        return _wise_ft(p, model, loaders, rows, sets, finish)
    if method in MERGES:
        return _merge(method, p, model, loaders, sets, finish)

    def loss_fn(variables, batch, logit_scale):
        images, labels = batch
        x = preprocess.normalize(images, prep)
        if p.bn == "recompute":  # BatchNorm on the batch's own statistics, as the soup will be
            logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(variables, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logit_scale * logits, labels).mean()

    batches = _image_batches(sets["heldout"])
    soup, report = soups.learned(
        loaders,
        loss_fn,
        batches,
        max_bytes=p.learned_max_bytes,
        by_layer=p.learned_by_layer,
        learn_temperature=True,  # as the paper's learned soup (averaging.learned)
    )
    details = {"members": list(p.names), "report": report._asdict()}
    if not p.learned_by_layer:
        details["weights"] = list(report.weights)
    return finish(soup), details
