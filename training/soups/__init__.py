"""Combining fine-tuned weights: model soups (uniform, greedy, learned; Wortsman et al., ICML
2022) in `averaging`, WiSE-FT, task arithmetic, TIES and DARE in `merges`, the checks on
ingredients in `ingredients`, and BatchNorm statistics recomputed for merged weights in
`batch_stats`."""

from training.soups.averaging import GreedyReport, LearnedReport, greedy, learned, uniform
from training.soups.batch_stats import recompute_batch_stats
from training.soups.ingredients import check_ingredients
from training.soups.merges import (
    InterpolationSweep,
    dare,
    interpolate,
    sweep_interpolation,
    task_arithmetic,
    ties,
)

__all__ = [
    "GreedyReport",
    "InterpolationSweep",
    "LearnedReport",
    "check_ingredients",
    "dare",
    "greedy",
    "interpolate",
    "learned",
    "recompute_batch_stats",
    "sweep_interpolation",
    "task_arithmetic",
    "ties",
    "uniform",
]
