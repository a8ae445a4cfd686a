"""training: producing new weights — fine-tuning (full, linear, BitFit, SSF), masks, optimisers,
checkpoints, run folders, sweeps, soups and merges, and the multi-process launcher."""

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
from training.run_config import RunConfig, RunError
from training.run_folder import Run, load_run
from training.soups import GreedyReport, LearnedReport, greedy, learned, uniform

__all__ = [
    "GreedyReport",
    "InterpolationSweep",
    "LearnedReport",
    "Run",
    "RunConfig",
    "RunError",
    "check_ingredients",
    "dare",
    "greedy",
    "interpolate",
    "learned",
    "load_run",
    "recompute_batch_stats",
    "sweep_interpolation",
    "task_arithmetic",
    "ties",
    "uniform",
]
