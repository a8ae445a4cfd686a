"""A cascade report (`hubtune.serve.report.run_report`) as text, ``cascade.json`` and
``cascade.png``.

The picture is the paper's (Wang et al., ICLR 2022, Fig. 1): test accuracy against average
GFLOPs per image. Single models are labelled points; the Pareto frontier of cascades (fitted on
held-out data, scored on test) and the ensembles of the cheapest k models are curves; the chosen
cascade is a star. Labels are the members' short names (run folder names, never paths) without the
parts all of them share (a sweep's common settings), cut to `MAX_LABEL` characters.

References:
  Wang, Kondratyuk, Christiansen, Kitani, Alon, Eban. "Wisdom of Committees: An Overlooked
  Approach to Faster and More Accurate Models." ICLR 2022. https://arxiv.org/abs/2012.01988
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np

from hubtune import output
from jaxmodels.atomic_files import write_new

OUTPUTS = ("cascade.json", "cascade.png")
MAX_LABEL = 18
MAX_PRINTED_POINTS = 12  # frontier rows printed; cascade.json has them all
_MAX_ANNOTATED = 10  # more single models than this are told apart by a legend instead


def _table(header, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


def _chain(members) -> str:
    return " → ".join(members)


def short_label(label: str) -> str:
    """`label` cut to `MAX_LABEL` characters (an ellipsis marks the cut)."""
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def short_labels(labels: list[str]) -> list[str]:
    """Labels without the parts all of them share, each cut to `MAX_LABEL` characters.

    A sweep's runs are named by every swept value (``lr=0.001_seed=0_aug=light``); in a plot
    only what tells them apart matters (``seed=0``). Parts are separated by ``_`` or ``/``;
    labels of different part counts, or that would no longer differ, are kept whole.
    """
    parts = [re.split(r"[_/]", label) for label in labels]
    if len(labels) > 1 and len({len(p) for p in parts}) == 1:
        differing = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        shorter = ["_".join(p[i] for i in differing) for p in parts]
        if differing and len(set(shorter)) == len(labels):
            labels = shorter
    return [short_label(label) for label in labels]


def format_report(report: dict) -> str:
    """The report as text: the frontier, then the chosen cascade beside each single model and
    the full ensemble, the goal and the measured speedup."""
    timing, data = report["timing"], report["data"]
    frontier = report["frontier"]
    shown = sorted({round(i) for i in np.linspace(0, len(frontier) - 1, MAX_PRINTED_POINTS)})
    lines = [
        f"Pareto frontier on held-out data ({data['held-out']['images']} images; rule "
        f"{report['rule']}, confidence {report['confidence']}), scored on test"
        + (
            f" ({len(shown)} of {report['frontier_points_found']} points; more in cascade.json):"
            if len(shown) < report["frontier_points_found"]
            else ":"
        )
    ]
    rows = [
        [_chain(p["members"]), ", ".join(f"{t:.4f}" for t in p["thresholds"]) or "-",
         f"{p['heldout_accuracy']:.4f}", f"{p['heldout_gflops']:.4g}",
         f"{p['test']['accuracy']:.4f}", f"{p['test']['gflops']:.4g}"]
        for p in (frontier[i] for i in shown)
    ]  # fmt: skip
    header = ["cascade", "thresholds", "held-out acc", "GFLOPs", "test acc", "GFLOPs"]
    lines += ["  " + line for line in _table(header, rows)]

    def ms(key, index=None):
        if timing is None:
            return "-"
        value = timing[key] if index is None else timing[key][index]
        return f"{value:.4g}"

    header = ["on test", "accuracy", "GFLOPs/image", "ms/image", "held-out acc"]
    rows = [
        [
            m["label"],
            f"{m['test_accuracy']:.4f}",
            f"{m['gflops']:.4g}",
            ms("member_ms_per_image", i),
            f"{m['heldout_accuracy']:.4f}",
        ]
        for i, m in enumerate(report["members"])
    ]
    full, cascade = report["ensembles"][-1], report["cascade"]
    rows.append(
        [
            f"ensemble of all {len(full['members'])}",
            f"{full['test_accuracy']:.4f}",
            f"{full['gflops']:.4g}",
            ms("ensemble_ms_per_image"),
            f"{full['heldout_accuracy']:.4f}",
        ]
    )
    rows.append(
        [
            f"cascade {_chain(cascade['members'])}",
            f"{cascade['test']['accuracy']:.4f}",
            f"{cascade['test']['gflops']:.4g}",
            ms("cascade_ms_per_image"),
            f"{cascade['heldout']['accuracy']:.4f}",
        ]
    )
    lines += [
        "",
        f"The chosen cascade beside each model and the ensemble "
        f"({data['test']['images']} test images):",
    ]
    lines += ["  " + line for line in _table(header, rows)]

    goal = report["goal"]
    target = (
        f"held-out accuracy ≥ {goal['target_accuracy']:.4f}"
        if goal["target_accuracy"] is not None
        else f"≤ {goal['flops_budget_gflops']:.4g} GFLOPs per image"
    )
    outcome = "reached" if goal["reached"] else goal["message"]
    lines += ["", f"goal: {target} ({goal['reason']}): {outcome}"]
    thresholds = ", ".join(f"{t:.4f}" for t in cascade["thresholds"]) or "-"
    exits = "/".join(f"{f:.2f}" for f in cascade["test"]["exit_fractions"])
    lines.append(
        f"cascade thresholds {thresholds}; share of test images answered per stage {exits}"
    )
    if timing is not None:
        executor = timing["executor"]
        lines.append(
            f"measured speedup over {report['members'][-1]['label']}: "
            f"{timing['cascade_speedup_over_costliest']:.2f}× (FLOPs predict "
            f"{timing['cascade_flops_speedup_over_costliest']:.2f}×); the executor agrees with "
            f"the simulation on {executor['agreement_with_simulation']:.2%} of test images"
        )
    return "\n".join(lines)


def plot_report(report: dict, path: str | os.PathLike) -> None:
    """Draws `report_figure` into `path` (a PNG)."""
    report_figure(report).savefig(path, dpi=120)


def report_figure(report: dict):
    """Test accuracy against average GFLOPs per image (module docstring).

    Returns:
      A `matplotlib.figure.Figure` (not registered with pyplot: no global state, no window).
    """
    import matplotlib
    from matplotlib.figure import Figure

    members, ensembles = report["members"], report["ensembles"]
    frontier = sorted(report["frontier"], key=lambda p: p["test"]["gflops"])
    fig = Figure(figsize=(8.6, 5.0))
    ax = fig.subplots()
    names = dict(zip((m["label"] for m in members), short_labels([m["label"] for m in members]),
                     strict=True))  # fmt: skip
    ax.plot(
        [p["test"]["gflops"] for p in frontier],
        [p["test"]["accuracy"] for p in frontier],
        "-o",
        color="tab:blue",
        markersize=3.5,
        lw=1.5,
        label="cascades (held-out frontier)",
    )
    ax.plot(
        [e["gflops"] for e in ensembles],
        [e["test_accuracy"] for e in ensembles],
        "--s",
        color="tab:green",
        markersize=4,
        lw=1.2,
        label="ensembles of the cheapest k",
    )
    annotate = len(members) <= _MAX_ANNOTATED
    colors = matplotlib.colormaps["tab10" if len(members) <= 10 else "tab20"].colors
    for i, m in enumerate(members):
        color = "black" if annotate else colors[i % len(colors)]
        ax.scatter(
            m["gflops"],
            m["test_accuracy"],
            s=36,
            color=color,
            zorder=3,
            label=None if annotate else names[m["label"]],
        )
        if annotate:  # on a light box above the curves and the star, so it stays legible
            ax.annotate(
                names[m["label"]], (m["gflops"], m["test_accuracy"]),
                xytext=(6, -12 if i % 2 else 6), textcoords="offset points", fontsize=8,
                zorder=5, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.8,
                                "lw": 0},
            )  # fmt: skip
    chosen = report["cascade"]
    ax.scatter(
        chosen["test"]["gflops"],
        chosen["test"]["accuracy"],
        marker="*",
        s=220,
        color="tab:red",
        zorder=4,
        label="chosen: " + _chain(names[n] for n in chosen["members"]),
    )
    gflops = [m["gflops"] for m in members] + [e["gflops"] for e in ensembles]
    if max(gflops) / min(gflops) > 20:
        ax.set_xscale("log")
    ax.margins(0.08)  # room for the labels of points at the edges
    ax.set_xlabel("average GFLOPs per image (test)")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"{short_label(report['data']['test']['spec'].rstrip('/').split('/')[-1])}: "
        f"cascades, ensembles and single models",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    # beside the axes, never over a point
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def write_outputs(report: dict, out: str | os.PathLike) -> list[pathlib.Path]:
    """Writes ``cascade.json`` and ``cascade.png`` into `out` (created), each atomically, and
    never over an existing file: if a report appeared in `out` since `hubtune.output.check`
    passed it, both go to `hubtune.output.free_sibling(out)` instead (the caller sees where from
    the returned paths).

    Returns:
      The paths written.
    """
    folder = pathlib.Path(out)
    while True:
        paths = [folder / name for name in OUTPUTS]
        written = []
        try:
            for path, write in zip(paths, (_write_json, plot_report), strict=True):
                write_new(path, lambda tmp, write=write: write(report, tmp))
                written.append(path)
            return paths
        except FileExistsError:  # lost a race with another writer: keep the pair together
            for path in written:
                path.unlink()
            folder = output.free_sibling(out)


def _write_json(report: dict, path: pathlib.Path) -> None:
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
