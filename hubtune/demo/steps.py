"""The demo's four steps (hubtune demo): each calls the library and returns what it measured.

Every step returns ``{"report": JSON-able numbers, ...objects the next step needs}``; report.md and
the plots are written from the reports by `demo_report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time

import jax
import numpy as np

import jaxmodels
from scoring.hub import ranking as hub_ranking
from training import load_run
from training import run as run_lib
from training import run_folder as folder_lib
from training import sweep as sweep_lib
from training.config import RunConfig

SCORES = tuple(hub_ranking.SCORES)  # every score the hub ranking knows
CLASSES = 5


class Clock:
    """Times named steps and prints each as it starts and ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        print(f"\n== {name}", flush=True)
        tick = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - tick, 1)
        print(f"   ({self.seconds[name]:.1f} s)", flush=True)


def data_sizes(splits: dict) -> dict[str, int]:
    return {name: len(labels) for name, (_, labels) in splits.items()}


def describe_data(splits: dict) -> str:
    sizes = data_sizes(splits)
    return (
        f"digits (scikit-learn), 32×32: source 0–4: {sizes['source_train']} train / "
        f"{sizes['source_heldout']} held-out; target 5–9: {sizes['target_train']} train "
        f"({sizes['target_train'] // CLASSES} per class) / {sizes['target_heldout']} held-out / "
        f"{sizes['target_test']} test"
    )


def _quiet(_line: str) -> None:
    """Run logs (per-epoch evaluations) stay in each run's metrics.jsonl."""


def _config(**fields) -> RunConfig:
    """The demo's common recipe: no flips (digits are not mirror-symmetric), one device batch;
    one checkpoint and one evaluation, at the end (the demo reads only the final accuracy)."""
    defaults = dict(
        augmentation="none",
        num_workers=2,
        checkpoint_every=10**6,
        eval_every=10**6,
        warmup_epochs=0.5,
        weight_decay=0.05,
    )
    return RunConfig(**{**defaults, **fields})


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
    label: str
    folder: pathlib.Path
    source_accuracy: float


def pretrain_hub(members, data, recipe, cache, seed, member_key) -> list[PretrainedModel]:
    """Pre-trains every member on the source task; finished run folders are reused as they are."""
    hub = []
    for member in members:
        train = (
            data[f"source_train_noise{member.label_noise}"]
            if member.label_noise
            else (data["source_train"])
        )
        key = member_key(member, recipe, train, seed)
        init_dir = cache / "hub" / "inits" / f"{member.label}-{key}"
        if not init_dir.exists():  # the member's random initialisation, as a loadable folder
            model = jaxmodels.create(member.name, num_classes=CLASSES, **dict(member.overrides))
            variables = jax.device_get(jaxmodels.models.registry.init_variables(model, seed))
            overrides = jaxmodels.models.registry.overrides_of(member.name, model)
            jaxmodels.save(init_dir, member.name, variables, **overrides)
        folder = cache / "hub" / f"{member.label}-{key}"
        config = _config(
            model=f"{member.name}={init_dir}",
            train_data=train,
            eval_data=data["source_heldout"],
            out_dir=str(folder),
            mode="full",
            epochs=member.epochs or recipe.pretrain_epochs,
            batch_size=recipe.batch,
            lr=2e-3,
            seed=seed,
            init_seed=seed,
        )
        reused = (folder / "result.json").exists()
        result = run_lib.run(config, progress=False, log=_quiet)
        accuracy = result["final_eval"]["accuracy"]
        how = "reused from the cache" if reused else "trained"
        print(f"   {member.label:<18} source accuracy {accuracy:.3f}  ({how}: {folder.name})")
        hub.append(PretrainedModel(member.label, folder, accuracy))
    return hub


def prepared_sets(spec: str, models, batch: int) -> dict:
    """One prepared (decoded, resized, on-device) copy of `spec` per distinct preprocessing."""
    sets = {}
    for model in models:
        prep = jaxmodels.spec_of(model).preprocessing
        if prep not in sets:
            sets[prep] = jaxmodels.prepare(spec, prep, batch_size=batch, progress=False)
    return sets


def _test_accuracy(run, test_sets) -> float:
    prepared = test_sets[jaxmodels.spec_of(run.model).preprocessing]
    return jaxmodels.evaluate(run.model, run.variables, prepared).accuracy


def select(hub, data, recipe, out, seed, features_cache) -> dict:
    """Scores every member on the target's training split, and fine-tunes every member on it."""
    refs = [f"{m.label}:{m.folder}" for m in hub]
    ranking = hub_ranking.rank_hub(
        refs,
        data["target_train"],
        scores=SCORES,
        cache_dir=features_cache,
        log=_quiet,
        progress=False,
    )
    finetuned = {}
    for member in hub:
        config = _config(
            model=str(member.folder),
            train_data=data["target_train"],
            eval_data=data["target_heldout"],
            out_dir=str(out / "select" / member.label),
            mode="full",
            epochs=recipe.finetune_epochs,
            batch_size=recipe.batch,
            lr=1e-3,
            seed=seed,
            init_seed=seed,
        )
        run_lib.run(config, progress=False, log=_quiet)
        finetuned[member.label] = load_run(config.out_dir)
    test_sets = prepared_sets(
        data["target_test"], [r.model for r in finetuned.values()], recipe.batch
    )
    accuracies = {label: _test_accuracy(run, test_sets) for label, run in finetuned.items()}
    ranking.accuracies = accuracies
    labels = ranking.models
    ranking.agreement = hub_ranking.agreement(ranking, accuracies)
    for label in labels:
        print(
            f"   {label:<18} LogME {ranking.values[label]['logme']:+.3f}  fine-tuned "
            f"test accuracy {accuracies[label]:.3f}"
        )
    hub_ranking.write_outputs(ranking, out / "select")
    top = max(labels, key=lambda m: ranking.values[m]["logme"])
    best = max(labels, key=lambda m: accuracies[m])
    report = {
        "models": labels,
        "scores": ranking.values,
        "finetuned_accuracy": accuracies,
        "agreement": {s: a._asdict() for s, a in ranking.agreement.items() if a is not None},
        "logme_top": top,
        "best": best,
        "plot": "select/ranking.png",
    }
    return {"report": report, "top": next(m for m in hub if m.label == top), "finetuned": finetuned}


def tune(top, hub, data, recipe, out, seed) -> dict:
    """A linear probe of the top member, an SSF sweep from the probe, full fine-tuning from it."""
    folder = out / "tune"
    common = dict(
        train_data=data["target_train"],
        eval_data=data["target_heldout"],
        batch_size=recipe.batch,
        seed=seed,
        init_seed=seed,
    )
    probe = _config(
        model=str(top.folder),
        out_dir=str(folder / "linear-probe"),
        mode="linear",
        epochs=recipe.probe_epochs,
        lr=1e-2,
        **common,
    )
    run_lib.run(probe, progress=False, log=_quiet)
    start = str(folder / "linear-probe")  # LP-FT: every later run starts from the probe
    base = _config(
        model=start,
        out_dir=str(folder / "ssf-sweep"),
        mode="ssf",
        epochs=recipe.finetune_epochs,
        **common,
    )
    grid = {"lr": list(recipe.ssf_lrs), "seed": list(recipe.ssf_seeds)}
    sweep_lib.run_sweep(
        sweep_lib.expand_grid(base, grid), grid, base.out_dir, progress=False, log=_quiet
    )
    full = _config(
        model=start,
        out_dir=str(folder / "full"),
        mode="full",
        epochs=recipe.finetune_epochs,
        lr=1e-3,
        **common,
    )
    run_lib.run(full, progress=False, log=_quiet)

    runs = {"linear probe": load_run(probe.out_dir), "full fine-tuning": load_run(full.out_dir)}
    sweep = load_run(base.out_dir)
    test_sets = prepared_sets(data["target_test"], [runs["linear probe"].model], recipe.batch)
    rows = {}
    for name, run in [*runs.items(), *((f"SSF {r.name}", r) for r in sweep)]:
        rows[name] = {
            "test_accuracy": _test_accuracy(run, test_sets),
            "heldout_accuracy": run.result["final_eval"]["accuracy"],
            "trainable_params": run.result["trainable_params"],
            "total_params": run.result["total_params"],
        }
    best_ssf = max(sweep, key=lambda r: r.result["final_eval"]["accuracy"])
    fold = fold_check(best_ssf, test_sets)
    for name, row in rows.items():
        print(
            f"   {name:<30} test {row['test_accuracy']:.3f}  trainable {row['trainable_params']:,}"
        )
    print(
        f"   fold check ({best_ssf.name}): max |Δlogit| {fold['max_abs_logit_difference']:.2e}, "
        f"same predictions: {fold['same_predictions']}"
    )
    report = {
        "member": top.label,
        "runs": rows,
        "best_ssf": f"SSF {best_ssf.name}",
        "fold_check": fold,
    }
    return {"report": report, "sweep": sweep}


def fold_check(run, test_sets) -> dict:
    """The folded (deployed) SSF model against the unfolded trained one, on the test split."""
    prepared = test_sets[jaxmodels.spec_of(run.model).preprocessing]
    model, unfolded = folder_lib.trained_variables(run.folder)
    folded = jaxmodels.predict(run.model, run.variables, prepared, progress=False)
    trained = jaxmodels.predict(model, unfolded, prepared, progress=False)
    difference = float(np.max(np.abs(folded - trained)))
    scale = float(np.max(np.abs(trained)))
    same = bool(np.array_equal(folded.argmax(1), trained.argmax(1)))
    return {
        "max_abs_logit_difference": difference,
        "max_abs_logit": scale,
        "same_predictions": same,
        "passed": same and difference <= 1e-4 * max(scale, 1.0),
    }
