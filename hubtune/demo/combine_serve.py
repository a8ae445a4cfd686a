"""The demo's last two steps (hubtune demo): soups of the SSF sweep, a cascade of the hub.

Each returns ``{"report": JSON-able numbers}``, written out by `demo_report`.
"""

from __future__ import annotations

import numpy as np

import jaxmodels
from hubtune.demo.steps import prepared_sets
from jaxmodels.committees import deploy, rules, timing
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
    ensemble_logits = rules.mean_logits(np.stack(test_logits))
    ensemble_accuracy = float(np.mean(ensemble_logits.argmax(1) == labels))
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
    """The fine-tuned members served as the library chooses (`jaxmodels.committees.deploy`).

    Each member's time per image is measured on the held-out images, on this device; the goal is
    the costliest member's held-out accuracy (the paper's). A cascade is deployed only when its
    predicted time beats the fastest single model meeting the goal by 1.1×; both are then timed
    on the test images, interleaved, best of 3, and the realized speed-up is reported beside the
    predicted one.
    """
    labels = sorted(finetuned, key=lambda m: jaxmodels.spec_of(finetuned[m].model).flops_per_image)
    runs = [finetuned[m] for m in labels]
    flops = [float(jaxmodels.spec_of(r.model).flops_per_image) for r in runs]
    heldout = prepared_sets(data["target_heldout"], [r.model for r in runs], recipe.batch)
    test = prepared_sets(data["target_test"], [r.model for r in runs], recipe.batch)
    members = [
        jaxmodels.Member(r.model, r.variables, f, jaxmodels.spec_of(r.model).preprocessing, name)
        for r, f, name in zip(runs, flops, labels, strict=True)
    ]

    def logits_MNC(images_M):
        """Each member's logits [M, N, C] from the executor that serves it, a one-stage
        `Cascade`: the programs `measure_costs` and the timed runs use, compiled once."""
        return np.stack([jaxmodels.Cascade([m], []).run([x]).logits
                         for m, x in zip(members, images_M, strict=True)])  # fmt: skip

    def images(sets):
        """Each member's uint8 images [N, S, S, 3], as the executor takes them (one array per
        preprocessing, shared by its members)."""
        host = {prep: prepared.host_images() for prep, prepared in sets.items()}
        return [host[m.preprocessing] for m in members]

    held_images, test_images = images(heldout), images(test)
    held_MNC, test_MNC = logits_MNC(held_images), logits_MNC(test_images)
    held_labels = next(iter(heldout.values())).labels
    test_labels = next(iter(test.values())).labels
    held_acc = (held_MNC.argmax(-1) == held_labels).mean(axis=1)
    target = float(held_acc[-1])
    costs = deploy.measure_costs(members, held_images)
    chosen = deploy.choose(held_MNC, held_labels, costs, target, flops_M=flops, names=labels)

    single = jaxmodels.Cascade([members[chosen.single]], [])
    contenders = {"single": lambda: single.run([test_images[chosen.single]])}
    if chosen.is_cascade:
        cascade = jaxmodels.Cascade([members[i] for i in chosen.members], chosen.thresholds)
        contenders["cascade"] = lambda: cascade.run([test_images[i] for i in chosen.members])
    outputs = {key: run() for key, run in contenders.items()}  # compiles every shape
    seconds = timing.best_seconds(contenders, repeats=3)

    def row(key, chain):
        result = outputs[key]
        return {
            "members": [labels[i] for i in chain],
            "test_accuracy": float(np.mean(result.predictions == test_labels)),
            "avg_gflops": result.avg_flops / 1e9,
            "ms_per_image": 1e3 * seconds[key] / len(test_labels),
            "exit_fractions": [float(x) for x in result.exit_fractions],
        }

    rows = {"fastest single model meeting the goal": row("single", (chosen.single,))}
    if chosen.is_cascade:
        rows["deployed cascade"] = {
            **row("cascade", chosen.members),
            "thresholds": [float(t) for t in chosen.thresholds],
            "heldout_accuracy": chosen.heldout_accuracy,
            "predicted_speedup": chosen.predicted_speedup,
            "realized_speedup": seconds["single"] / seconds["cascade"],
        }
    best_cascade = None
    if chosen.best_cascade is not None:
        chain, _, speedup = chosen.best_cascade
        best_cascade = {"members": [labels[i] for i in chain], "predicted_speedup": speedup}
    singles = {
        label: {
            "test_accuracy": float(np.mean(test_MNC[i].argmax(1) == test_labels)),
            "heldout_accuracy": float(held_acc[i]),
            "gflops": flops[i] / 1e9,
            "measured_ms_per_image": 1e3 * costs.seconds(i, len(held_labels)) / len(held_labels),
        }
        for i, label in enumerate(labels)
    }
    for name, r in rows.items():
        print(
            f"   {name:<38} {' → '.join(r['members'])}: test {r['test_accuracy']:.3f}, "
            f"{r['avg_gflops'] * 1e3:.2f} MFLOPs/img, {r['ms_per_image']:.3f} ms/img"
        )
    if chosen.message:
        print(f"   {chosen.message}")
    report = {
        "target_heldout_accuracy": target,
        "rows": rows,
        "singles": singles,
        "found": chosen.is_cascade,
        "best_cascade": best_cascade,
        "message": chosen.message,
        "plot": "cascade.png",
    }
    return {"report": report}
