"""The outcome of ranking a model hub: a table, `ranking.json` and `ranking.png`.

For `scoring.hub.ranking` and `hubtune rank`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import textwrap

import numpy as np

from scoring import rank_correlation


@dataclasses.dataclass
class Ranking:
    """The outcome of `rank_hub`.

    Attributes:
        data: the DATA_SPEC.
        scores: the score names, in the order asked for.
        models: model labels, in the order given.
        values: {model: {score: value}}.
        ranks: {model: {score: rank}}, 1 = the score's best model.
        cached: {model: whether its features/statistics came from the cache}.
        accuracies: {model: fine-tuned accuracy} or None.
        agreement: {score: RankAgreement, or None where the score ties every model} or None.
        error: what stopped the ranking early (a score that failed), or None.
    """

    data: str
    scores: list[str]
    models: list[str]
    values: dict[str, dict[str, float]]
    ranks: dict[str, dict[str, int]]
    cached: dict[str, bool]
    accuracies: dict[str, float] | None = None
    agreement: dict[str, rank_correlation.RankAgreement | None] | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return {
            "data": self.data,
            "scores": self.scores,
            "models": [
                {
                    "model": m,
                    "scores": self.values[m],
                    "ranks": self.ranks[m],
                    "accuracy": None if self.accuracies is None else self.accuracies[m],
                    "from_cache": self.cached.get(m),
                }
                for m in self.models
            ],
            "rank_correlation": None
            if self.agreement is None
            else {s: None if a is None else a._asdict() for s, a in self.agreement.items()},
            "error": self.error,
        }


def format_table(ranking: Ranking) -> str:
    """The ranking as a text table: one row per model, `value (rank)` per score."""
    header = ["model", *ranking.scores]
    rows = [
        [m, *(f"{ranking.values[m][s]:.5g} ({ranking.ranks[m][s]})" for s in ranking.scores)]
        for m in ranking.models
    ]
    if ranking.accuracies is not None:
        header.append("accuracy")
        for row, m in zip(rows, ranking.models, strict=True):
            row.append(f"{ranking.accuracies[m]:.4f}")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    if ranking.agreement is not None:
        lines += ["", "score                weighted τ  Kendall τ  Spearman ρ  top-1 regret"]
        for name, a in ranking.agreement.items():
            if a is None:
                lines.append(f"{name:<20s} undefined: every model scores the same")
                continue
            lines.append(
                f"{name:<20s} {a.weighted_tau:10.3f} {a.kendall_tau:10.3f} {a.spearman_rho:11.3f}"
                f" {a.top1_regret:13.4f}"
            )
    return "\n".join(lines)


def plot_ranking(ranking: Ranking, path: str | pathlib.Path) -> None:
    """Score vs fine-tuned accuracy, one panel per score, one colour and marker per model.

    Models are told apart by one shared legend (labels written next to points overlap once a hub
    has more than a handful of models): in the grid's empty slots after the last panel when
    there are any, else below the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ranking.scores)
    cols = min(n, 4)
    rows = -(-n // cols)
    width = 3.6 * cols
    empty = rows * cols - n  # slots after the last panel: the legend goes there
    # else below, in as many columns as the width holds (about 1.8 inches each)
    legend_cols = max(1, min(len(ranking.models), 4, int(width / 1.8)))
    below = 0.0 if empty else 0.3 + 0.2 * -(-len(ranking.models) // legend_cols)  # inches
    # a file's name, not its path; wrapped to the width (about 13 characters an inch)
    data = ranking.data if ranking.data.startswith("tfds:") else pathlib.Path(ranking.data).name
    heading = textwrap.fill(
        f"transferability scores vs fine-tuned accuracy on {data}", int(13 * width)
    )
    above = 0.05 + 0.2 * (heading.count("\n") + 1)  # inches
    fig, axes = plt.subplots(rows, cols, figsize=(width, 3.2 * rows + above + below), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    markers = "os^Dv<>pP*Xh"
    colors = plt.get_cmap("tab10" if len(ranking.models) <= 10 else "tab20").colors
    accs = [ranking.accuracies[m] for m in ranking.models]
    for ax, name in zip(axes.flat, ranking.scores, strict=False):
        for i, (model, acc) in enumerate(zip(ranking.models, accs, strict=True)):
            ax.scatter(
                ranking.values[model][name], acc, label=model, s=40,
                marker=markers[i % len(markers)], color=colors[i % len(colors)],
            )  # fmt: skip
        ax.set_xlabel(name, fontsize=9)
        ax.set_ylabel("fine-tuned accuracy", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.locator_params(axis="x", nbins=4)  # few ticks: long numbers never overlap
        if ranking.agreement is not None:
            a = ranking.agreement[name]
            title = "all models tie" if a is None else f"weighted τ = {a.weighted_tau:.2f}"
            ax.set_title(title, fontsize=9)
            if a is None:  # one value up to rounding: its own ticks, not an offset of 1e-12
                value = float(np.mean([ranking.values[m][name] for m in ranking.models]))
                pad = 0.05 * max(abs(value), 1.0)
                ax.set_xlim(value - pad, value + pad)
                ax.ticklabel_format(axis="x", useOffset=False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if empty:  # about 12 entries fit a slot's height; more go in columns across the slots
        axes.flat[n].legend(
            handles, labels, loc="center left", ncol=min(-(-len(labels) // 12), 2 * empty),
            fontsize=8, frameon=False, title="model", title_fontsize=8,
        )  # fmt: skip
    else:
        fig.legend(handles, labels, loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    fig.suptitle(heading, fontsize=10)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, below / height, 1, 1))  # the heading: tight_layout leaves its room
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(ranking: Ranking, out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes ranking.json (and ranking.png with ground truth) into `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "ranking.json"]
    written[0].write_text(json.dumps(ranking.to_json(), indent=2))
    if ranking.agreement is not None:
        written.append(out_dir / "ranking.png")
        plot_ranking(ranking, written[-1])
    return written
