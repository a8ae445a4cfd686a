"""``soup.png``: the greedy soup's held-out accuracy as runs are tried, against the runs alone.

One picture answers "did souping help, and which runs made it in": the x axis lists the runs in
the greedy order (best held-out accuracy first, labelled by run folder name), the grey points are
the runs alone, the blue steps the greedy soup after each run is tried (filled where the run was
kept, crossed out where it was refused), and horizontal lines mark the other soups and the logit
ensemble of all runs (k× the inference cost of one model).
"""

from __future__ import annotations

import os

import numpy as np

_MAX_LABELS = 30  # beyond this many runs, label every other tick (and so on)
_CURVE_STYLES = {"wise-ft": ("tab:brown", "o"), "task-arithmetic": ("tab:olive", "s"),
                 "ties": ("tab:cyan", "^"), "dare": ("tab:pink", "v")}  # fmt: skip


def plot_soup(report: dict, path: str | os.PathLike, title: str | None = None) -> None:
    """Draws ``report`` (the content of ``soup.json``; ``ensemble`` and soups other than the
    greedy one optional) to a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["ingredients"]
    n = len(rows)
    alone = [row["heldout"]["accuracy"] for row in rows]
    greedy = report["soups"].get("greedy")
    order = greedy["report"]["order"] if greedy else sorted(range(n), key=lambda i: -alone[i])
    x = np.arange(n)
    curves = {m: report["soups"][m] for m in _CURVE_STYLES if m in report["soups"]}
    width = min(16.0, max(7.0, 0.45 * n + 4.0))
    if curves:  # held-out curves from the runs' start (0) to WiSE-FT's best run / a merge (1)
        fig, (ax, curve_ax) = plt.subplots(
            1, 2, figsize=(width + 4.5, 5.6), gridspec_kw={"width_ratios": [width, 4.5]}
        )
        for method, soup in curves.items():
            colour, marker = _CURVE_STYLES[method]
            curve = soup["curve"]
            curve_ax.plot(curve["alphas"], curve["heldout_accuracy"], marker=marker,
                          color=colour, label=f"{method} (best {soup['alpha']:g})")  # fmt: skip
            curve_ax.axvline(soup["alpha"], ls=":", color=colour)
        curve_ax.set_xlabel("α of WiSE-FT, λ of a merge (0: the runs' start)")
        curve_ax.set_ylabel("held-out accuracy")
        curve_ax.set_title("From the start: held-out curves", fontsize=11)
        curve_ax.legend(fontsize=8)
        curve_ax.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(width, 5.6))
    # the runs alone on top, small: visible inside the soup's marker where the two coincide
    ax.scatter(x, [alone[i] for i in order], s=28, marker="D", color="0.25", zorder=6,
               label="run alone")  # fmt: skip
    if greedy:
        steps = greedy["report"]
        kept = set(steps["accepted"])
        ax.plot(x, steps["soup_scores"], drawstyle="steps-post", lw=2.2, color="tab:blue",
                label=f"greedy soup ({len(kept)} of {n} runs kept)")  # fmt: skip
        tried = np.asarray(steps["candidate_scores"])
        was_kept = np.asarray([i in kept for i in order])
        ax.scatter(x[was_kept], tried[was_kept], s=90, color="tab:blue", zorder=5,
                   label="soup with the run: kept")  # fmt: skip
        if (~was_kept).any():
            ax.scatter(x[~was_kept], tried[~was_kept], s=90, marker="x", color="tab:red",
                       zorder=5, label="soup with the run: refused")  # fmt: skip
    if "ensemble" in report:
        ax.axhline(report["ensemble"]["heldout"]["accuracy"], ls="--", lw=1.5, color="tab:green",
                   label=f"logit ensemble of all {n} ({n}x inference)")  # fmt: skip
    styles = {"uniform": ("tab:orange", ":"), "learned": ("tab:purple", "-."),
              **{m: (colour, "--") for m, (colour, _) in _CURVE_STYLES.items()}}  # fmt: skip
    for method, (colour, style) in styles.items():
        if method in report["soups"]:
            ax.axhline(report["soups"][method]["heldout"]["accuracy"], ls=style, lw=1.5,
                       color=colour, label=f"{method} soup")  # fmt: skip
    every = int(np.ceil(n / _MAX_LABELS))
    ax.set_xticks(x[::every], [rows[i]["name"] for i in order][::every], rotation=30, ha="right")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("runs in greedy order (best held-out accuracy first)")
    ax.set_ylabel("held-out accuracy")
    recomputed = ", BatchNorm recomputed" if report.get("bn") == "recompute" else ""
    title = title or ("Greedy soup as runs are added" if greedy else "The runs and their soups")
    ax.set_title(f"{title} (held-out data{recomputed})", fontsize=11)
    ax.margins(y=0.08)
    ax.grid(axis="y", alpha=0.3)
    # the main panel's legend below both (the curves' panel has its own), clear of the labels
    handles, labels = ax.get_legend_handles_labels()
    rows = -(-len(handles) // 2)
    fig.set_figheight(fig.get_figheight() + 0.22 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.26 * rows / fig.get_figheight() + 0.01, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
