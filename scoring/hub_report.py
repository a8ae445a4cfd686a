"""The outcome of ranking a model hub: a table, `ranking.json` and `ranking.png`.

For `scoring.hub_ranking` and `scripts/rank.py`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

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
        agreement: {score: RankAgreement} or None.
    """

    data: str
    scores: list[str]
    models: list[str]
    values: dict[str, dict[str, float]]
    ranks: dict[str, dict[str, int]]
    cached: dict[str, bool]
    accuracies: dict[str, float] | None = None
    agreement: dict[str, rank_correlation.RankAgreement] | None = None

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
                    "from_cache": self.cached[m],
                }
                for m in self.models
            ],
            "rank_correlation": None
            if self.agreement is None
            else {s: a._asdict() for s, a in self.agreement.items()},
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
            lines.append(
                f"{name:<20s} {a.weighted_tau:10.3f} {a.kendall_tau:10.3f} {a.spearman_rho:11.3f}"
                f" {a.top1_regret:13.4f}"
            )
    return "\n".join(lines)


def plot_ranking(ranking: Ranking, path: str | pathlib.Path) -> None:
    """Score vs fine-tuned accuracy, one panel per score, saved as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ranking.scores)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    accs = [ranking.accuracies[m] for m in ranking.models]
    for ax, name in zip(axes.flat, ranking.scores, strict=False):
        xs = [ranking.values[m][name] for m in ranking.models]
        ax.scatter(xs, accs)
        for x, y, m in zip(xs, accs, ranking.models, strict=True):
            ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(name)
        ax.set_ylabel("fine-tuned accuracy")
        ax.set_title(f"{name}: weighted τ = {ranking.agreement[name].weighted_tau:.3f}")
    fig.tight_layout()
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
