"""The demo's report: report.json, report.md (a table and a one-line verdict per step) and plots.

Verdicts state what was measured, including when a paper's effect did not show at this scale.
"""

from __future__ import annotations

import json
import pathlib

from hubtune.soup import plot as soup_plot


def write(out: pathlib.Path, report: dict) -> list[pathlib.Path]:
    """Writes report.json, report.md, soup.png, cascade.png and excerpt.md into `out`; returns
    their paths and the ranking plot's."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "soup.png", out / "cascade.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    plot_soup(report["combine"], paths[2])
    plot_cascade(report["serve"], paths[3])
    (out / "excerpt.md").write_text(excerpt(report))
    return [*paths, out / report["select"]["plot"], out / "excerpt.md"]


def excerpt(report: dict) -> str:
    """What the README quotes: each step's verdict, as a Markdown quote, with nothing that
    depends on this machine's speed (so a fixed seed on a CPU reproduces it word for word)."""
    verdicts = [
        ("Select", _verdict(_select(report["select"]))),
        ("Tune", _verdict(_tune(report["tune"]))),
        ("Combine", _verdict(_combine(report["combine"]))),
        ("Serve", _serve_excerpt(report["serve"])),
    ]
    return "\n>\n".join(f"> **{step}:** {text}" for step, text in verdicts) + "\n"


def _verdict(section: str) -> str:
    return section.split("**Verdict:** ", 1)[1].split("\n\n", 1)[0]


def _serve_excerpt(serve: dict) -> str:
    """The serve step without its measured times: which single models meet the goal (a cascade
    is deployed only where it is predicted faster than the fastest of them, on your machine)."""
    goal = serve["target_heldout_accuracy"]
    meeting = [
        f"{name} (test {single['test_accuracy']:.3f})"
        for name, single in serve["singles"].items()
        if single["heldout_accuracy"] >= goal
    ]
    return (
        f"{len(meeting)} of {len(serve['singles'])} fine-tuned members meet the costliest "
        f"member's held-out accuracy ({goal:.3f}): {', '.join(meeting)}. A cascade is deployed "
        "only when the stage times measured on the machine running it predict at least 1.1× "
        "the speed of the fastest of these; the report says which was served and how fast."
    )


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu(setup: dict) -> str:
    cpu = setup.get("cpu")  # absent from reports written before hubtune recorded it
    return f"{cpu['model']} ({cpu['kind']})" if cpu else "an unrecorded CPU"


def markdown(report: dict) -> str:
    setup, sections = report["setup"], []
    sizes = setup["data"]
    sections.append(
        "# hubtune demo: select, tune, combine, serve on handwritten digits\n\n"
        f"Hub of {len(setup['members'])} small ResNets and ViTs pre-trained on digits 0–4 "
        f"({sizes['source_train']} images); target task digits 5–9 with "
        f"{sizes['target_train']} labelled training images, {sizes['target_heldout']} held-out "
        f"and {sizes['target_test']} test images. {'Quick' if setup['quick'] else 'Full'} run, "
        f"seed {setup['seed']}, on {_cpu(setup)}; every accuracy below is on the test split "
        "unless it says held-out (another kind of CPU rounds differently, and at this scale that "
        "can change the picks)."
    )
    sections.append(_select(report["select"]))
    sections.append(_tune(report["tune"]))
    sections.append(_combine(report["combine"]))
    sections.append(_serve(report["serve"]))
    times = ", ".join(f"{k.split(':')[0]} {v:.0f} s" for k, v in report["seconds"].items())
    sections.append(f"Time: {times}; {sum(report['seconds'].values()):.0f} s in all.")
    return "\n\n".join(sections) + "\n"


def _select(sel: dict) -> str:
    scores = list(next(iter(sel["scores"].values())))
    rows = [
        [m, *(f"{sel['scores'][m][s]:.3g}" for s in scores), f"{sel['finetuned_accuracy'][m]:.3f}"]
        for m in sel["models"]
    ]
    agree = [
        [s, f"{a['weighted_tau']:.2f}", f"{a['top1_regret']:.3f}"]
        for s, a in sel["agreement"].items()
    ]
    logme = sel["agreement"]["logme"]
    top, best = sel["logme_top"], sel["best"]
    acc = sel["finetuned_accuracy"]
    best_score = max(sel["agreement"], key=lambda s: sel["agreement"][s]["weighted_tau"])
    verdict = (
        f"**Verdict:** LogME ranked the hub with weighted τ = {logme['weighted_tau']:.2f} against "
        f"fine-tuned accuracy; its top pick {top} reached {acc[top]:.3f}, "
        + (
            "the best of the hub."
            if top == best
            else f"{logme['top1_regret']:.3f} below the best member, {best} ({acc[best]:.3f})."
        )
        + f" The best-agreeing score here was {best_score} "
        f"(τ = {sel['agreement'][best_score]['weighted_tau']:.2f})."
    )
    return "\n\n".join(
        [
            "## 1. Select: rank the hub without fine-tuning (LogME and its peers)",
            _table(["member", *scores, "fine-tuned acc."], rows),
            _table(["score", "weighted τ", "top-1 regret"], agree),
            f"![score vs fine-tuned accuracy]({sel['plot']})",
            verdict,
        ]
    )


def _tune(tune: dict) -> str:
    runs = tune["runs"]
    full = runs["full fine-tuning"]
    rows = [
        [
            name,
            f"{r['test_accuracy']:.3f}",
            f"{r['heldout_accuracy']:.3f}",
            f"{r['trainable_params']:,}",
            f"{100 * r['trainable_params'] / full['trainable_params']:.1f} %",
        ]
        for name, r in runs.items()
    ]
    ssf = runs[tune["best_ssf"]]
    probe = runs["linear probe"]
    fold = tune["fold_check"]
    fold_text = (
        f"the folded SSF model predicts exactly what the unfolded one does (max |Δlogit| = "
        f"{fold['max_abs_logit_difference']:.1e})"
        if fold["passed"]
        else f"FOLD CHECK FAILED: max |Δlogit| = {fold['max_abs_logit_difference']:.1e}, "
        f"same predictions: {fold['same_predictions']}"
    )
    verdict = (
        f"**Verdict:** SSF (best of the sweep by held-out accuracy, {tune['best_ssf']}) reached "
        f"{ssf['test_accuracy']:.3f} training {ssf['trainable_params']:,} parameters "
        f"({100 * ssf['trainable_params'] / full['trainable_params']:.1f} % of full "
        f"fine-tuning's), against {full['test_accuracy']:.3f} for full fine-tuning and "
        f"{probe['test_accuracy']:.3f} for the linear probe it started from; {fold_text}."
    )
    return "\n\n".join(
        [
            f"## 2. Tune: SSF on the top-ranked member ({tune['member']})",
            _table(["run", "test acc.", "held-out acc.", "trainable params", "of full"], rows),
            verdict,
        ]
    )


def _combine(comb: dict) -> str:
    rows = [
        [
            name,
            "—" if r["heldout"] is None else f"{r['heldout']:.3f}",
            f"{r['test']:.3f}",
            f"{r['inference_cost']}×",
        ]
        for name, r in comb["rows"].items()
    ]
    best = comb["rows"]["best single run (by held-out)"]["test"]
    greedy = comb["rows"]["greedy soup"]["test"]
    uniform = comb["rows"]["uniform soup"]["test"]
    ensemble_name = next(n for n in comb["rows"] if n.startswith("ensemble"))
    ensemble = comb["rows"][ensemble_name]["test"]
    accepted = comb["greedy"]["accepted_runs"]
    relation = "beat" if greedy > best else ("matched" if greedy == best else "did not beat")
    verdict = (
        f"**Verdict:** the greedy soup ({len(accepted)} of {len(comb['runs'])} runs) {relation} "
        f"the best single run on test ({greedy:.3f} vs {best:.3f}); the uniform soup scored "
        f"{uniform:.3f} and the logit ensemble {ensemble:.3f} at "
        f"{comb['rows'][ensemble_name]['inference_cost']}× the inference cost of one soup."
    )
    return "\n\n".join(
        [
            "## 3. Combine: model soups of the SSF sweep",
            _table(["model", "held-out acc.", "test acc.", "inference cost"], rows),
            f"![greedy soup]({comb['plot']})",
            verdict,
        ]
    )


def _serve(serve: dict) -> str:
    rows = [
        [
            name,
            " → ".join(r["members"]),
            f"{r['test_accuracy']:.3f}",
            f"{1e3 * r['avg_gflops']:.2f}",
            f"{r['ms_per_image']:.3f}",
        ]
        for name, r in serve["rows"].items()
    ]
    goal = f"the costliest member's held-out accuracy ({serve['target_heldout_accuracy']:.3f})"
    if serve["found"]:
        single = serve["rows"]["fastest single model meeting the goal"]
        cascade = serve["rows"]["deployed cascade"]
        verdict = (
            f"**Verdict:** deployed the cascade {' → '.join(cascade['members'])}: it meets {goal} "
            f"and was predicted from measured stage times at {cascade['predicted_speedup']:.2f}× "
            f"the speed of {single['members'][0]} alone; on test it scored "
            f"{cascade['test_accuracy']:.3f} against {single['test_accuracy']:.3f} at "
            f"{cascade['realized_speedup']:.2f}× the speed (measured, best of 3)."
        )
    else:
        verdict = f"**Verdict:** {serve['message']} (goal: {goal})."
    return "\n\n".join(
        [
            "## 4. Serve: a cascade only where it is faster",
            _table(["model", "members", "test acc.", "avg MFLOPs / image", "ms / image"], rows),
            f"![accuracy vs measured time]({serve['plot']})",
            verdict,
        ]
    )


def plot_soup(comb: dict, path: pathlib.Path) -> None:
    """The soup command's picture (`hubtune.soup.plot`) of the demo's greedy soup: runs alone,
    the soup as each is tried, kept or refused, and the uniform soup."""
    names = comb["runs"]
    soup_json = {
        "ingredients": [
            {"name": name, "heldout": {"accuracy": comb["individual_heldout"][name]}}
            for name in names
        ],
        "soups": {
            "greedy": {"report": comb["greedy"]},
            "uniform": {"heldout": {"accuracy": comb["rows"]["uniform soup"]["heldout"]}},
        },
    }
    soup_plot.plot_soup(soup_json, path, title="Greedy soup of the SSF sweep")


def plot_cascade(serve: dict, path: pathlib.Path) -> None:
    """Test accuracy vs measured ms per image: single members as points, the deployment marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    singles = serve["singles"]
    span_x = max(s["measured_ms_per_image"] for s in singles.values())
    placed = []
    for label, single in sorted(singles.items(), key=lambda kv: -kv[1]["test_accuracy"]):
        x, y = single["measured_ms_per_image"], single["test_accuracy"]
        ax.scatter(x, y, color="tab:blue", zorder=3)
        # a point next to one already labelled gets its label below, so the two stay legible
        crowded = any(abs(x - px) < 0.1 * span_x and abs(y - py) < 0.04 for px, py in placed)
        ax.annotate(
            label, (x, y), fontsize=7, xytext=(5, -9 if crowded else 3), textcoords="offset points"
        )
        placed.append((x, y))
    if serve["found"]:
        cascade = serve["rows"]["deployed cascade"]
        single = serve["rows"]["fastest single model meeting the goal"]
        # the cascade's measured time, on the scale of the single model's measured point
        scale = singles[single["members"][0]]["measured_ms_per_image"] / single["ms_per_image"]
        ax.scatter(
            scale * cascade["ms_per_image"],
            cascade["test_accuracy"],
            marker="*",
            s=160,
            color="tab:red",
            zorder=4,
            label=f"cascade {' → '.join(cascade['members'])} ({cascade['realized_speedup']:.2f}×)",
        )
    else:
        served = singles[serve["rows"]["fastest single model meeting the goal"]["members"][0]]
        ax.scatter(
            served["measured_ms_per_image"],
            served["test_accuracy"],
            s=220,
            facecolors="none",
            edgecolors="tab:red",
            zorder=4,
            label="served alone (no cascade predicted ≥ 1.1× faster)",
        )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    ax.margins(x=0.2, y=0.1)  # room for the labels right of the points
    ax.set_xlabel("ms per image (measured on this machine)")
    ax.set_ylabel("test accuracy")
    ax.set_title("fine-tuned members and what is served", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
