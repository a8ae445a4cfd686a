"""training: producing new weights — pipelines, fine-tuning, masks, checkpoints, soups."""

from training.batch_stats import recompute_batch_stats
from training.ingredients import check_ingredients
from training.merges import (
    InterpolationSweep,
    dare,
    interpolate,
    sweep_interpolation,
    task_arithmetic,
    ties,
)
from training.soups import GreedyReport, LearnedReport, greedy, learned, uniform

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
