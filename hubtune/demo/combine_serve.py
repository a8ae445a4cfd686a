"""The demo's last two steps (hubtune demo): soups of the SSF sweep, a cascade of the hub.

Each returns ``{"report": JSON-able numbers}``, written out by `demo_report`.
"""

from __future__ import annotations

import itertools

import numpy as np

import jaxmodels
from hubtune.demo.steps import prepared_sets
from training.soups import averaging as soups
from training.soups.ingredients import check_ingredients


def combine(sweep, data, recipe, out) -> dict:
    """Uniform and greedy soups of the SSF sweep, its best run and the ensemble of all runs."""
    check_ingredients([r.info for r in sweep])
    model = sweep[0].model
    prep = jaxmodels.spec_of(model).preprocessing
    heldout = jaxmodels.prepare(
        data["target_heldout"], prep, batch_size=recipe.batch, progress=False
    )
    test = jaxmodels.prepare(data["target_test"], prep, batch_size=recipe.batch, progress=False)

    def heldout_accuracy(variables):
        return jaxmodels.evaluate(model, variables, heldout).accuracy

    ingredients = [r.variables for r in sweep]
    uniform = soups.uniform(ingredients)
    greedy, greedy_report = soups.greedy(ingredients, heldout_accuracy)
    test_logits = [jaxmodels.predict(model, v, test, progress=False) for v in ingredients]
    labels = test.labels
    ensemble_accuracy = float(np.mean(np.mean(test_logits, axis=0).argmax(1) == labels))
    individual = {
        r.name: float(np.mean(lg.argmax(1) == labels))
        for r, lg in zip(sweep, test_logits, strict=True)
    }
    heldout_scores = {r.name: heldout_accuracy(r.variables) for r in sweep}
    best = max(heldout_scores, key=heldout_scores.get)
    rows = {
        "best single run (by held-out)": {
            "heldout": heldout_scores[best],
            "test": individual[best],
            "inference_cost": 1,
        },
        "uniform soup": {
            "heldout": heldout_accuracy(uniform),
            "test": jaxmodels.evaluate(model, uniform, test).accuracy,
            "inference_cost": 1,
        },
        "greedy soup": {
            "heldout": heldout_accuracy(greedy),
            "test": jaxmodels.evaluate(model, greedy, test).accuracy,
            "inference_cost": 1,
        },
        f"ensemble of all {len(sweep)} runs": {
            "heldout": None,
            "test": ensemble_accuracy,
            "inference_cost": len(sweep),
        },
    }
    names = [r.name for r in sweep]
    greedy_json = greedy_report._asdict()
    greedy_json["accepted_runs"] = [names[i] for i in greedy_report.accepted]
    for name, row in rows.items():
        print(f"   {name:<32} test {row['test']:.3f}")
    report = {
        "runs": names,
        "individual_test": individual,
        "individual_heldout": heldout_scores,
        "rows": rows,
        "best": best,
        "greedy": greedy_json,
        "plot": "soup.png",
    }
    return {"report": report}


def serve(finetuned, data, recipe, out) -> dict:
    """A cascade of fine-tuned members fitted to the costliest member's held-out accuracy."""
    labels = sorted(finetuned, key=lambda m: jaxmodels.spec_of(finetuned[m].model).flops_per_image)
    runs = [finetuned[m] for m in labels]
    flops = [float(jaxmodels.spec_of(r.model).flops_per_image) for r in runs]
    heldout = prepared_sets(data["target_heldout"], [r.model for r in runs], recipe.batch)
    test = prepared_sets(data["target_test"], [r.model for r in runs], recipe.batch)

    def logits(sets):
        return np.stack(
            [
                jaxmodels.predict(
                    r.model,
                    r.variables,
                    sets[jaxmodels.spec_of(r.model).preprocessing],
                    progress=False,
                )
                for r in runs
            ]
        )

    held_MNC, test_MNC = logits(heldout), logits(test)
    held_labels = next(iter(heldout.values())).labels
    test_labels = next(iter(test.values())).labels
    held_acc = [float(np.mean(lg.argmax(1) == held_labels)) for lg in held_MNC]
    # of the members of the highest cost, the most accurate on held-out data; earlier stages
    # must be strictly cheaper (an equal-cost stage saves nothing)
    top_cost = [i for i, f in enumerate(flops) if f == flops[-1]]
    costliest = max(top_cost, key=lambda i: held_acc[i])
    cheaper = [i for i, f in enumerate(flops) if f < flops[-1]]
    target = held_acc[costliest]
    best = None
    for size in (2, 3):  # ordered chains of cheaper members ending with the costliest
        for chain in itertools.combinations(cheaper, size - 1):
            chain = (*chain, costliest)
            fit = jaxmodels.fit_cascade(
                held_MNC[list(chain)],
                held_labels,
                [flops[i] for i in chain],
                target_accuracy=target,
            )
            if fit.reached and (best is None or fit.avg_cost < best[1].avg_cost):
                best = (chain, fit)
    members = [
        jaxmodels.Member(r.model, r.variables, f, jaxmodels.spec_of(r.model).preprocessing, name)
        for r, f, name in zip(runs, flops, labels, strict=True)
    ]
    images = [
        np.asarray(test[m.preprocessing].images).reshape(
            -1, *test[m.preprocessing].images.shape[2:]
        )[: len(test_labels)]
        for m in members
    ]
    alone = jaxmodels.Cascade([members[costliest]], [])
    alone.run([images[costliest]])  # compile outside the timing
    alone_out = alone.run([images[costliest]])
    rows = {
        "costliest member alone": {
            "members": [labels[costliest]],
            "test_accuracy": float(np.mean(alone_out.predictions == test_labels)),
            "avg_gflops": flops[costliest] / 1e9,
            "ms_per_image": 1e3 * alone_out.wall_seconds / len(test_labels),
        }
    }
    chosen = None
    if best is not None:
        chain, fit = best
        cascade = jaxmodels.Cascade([members[i] for i in chain], fit.thresholds)
        cascade.run([images[i] for i in chain])
        result = cascade.run([images[i] for i in chain])
        chosen = {
            "members": [labels[i] for i in chain],
            "thresholds": [float(t) for t in fit.thresholds],
            "test_accuracy": float(np.mean(result.predictions == test_labels)),
            "avg_gflops": result.avg_flops / 1e9,
            "ms_per_image": 1e3 * result.wall_seconds / len(test_labels),
            "exit_fractions": [float(x) for x in result.exit_fractions],
            "heldout_accuracy": fit.accuracy,
        }
        rows["cascade"] = chosen
    singles = {
        label: {
            "test_accuracy": float(np.mean(test_MNC[i].argmax(1) == test_labels)),
            "gflops": flops[i] / 1e9,
        }
        for i, label in enumerate(labels)
    }
    for name, row in rows.items():
        print(
            f"   {name:<24} {'+'.join(row['members'])}: test {row['test_accuracy']:.3f}, "
            f"{row['avg_gflops'] * 1e3:.2f} MFLOPs/img, {row['ms_per_image']:.3f} ms/img"
        )
    report = {
        "target_heldout_accuracy": target,
        "rows": rows,
        "singles": singles,
        "found": chosen is not None,
        "plot": "cascade.png",
    }
    return {"report": report}
