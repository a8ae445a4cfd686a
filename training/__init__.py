"""training: producing new weights — fine-tuning (full, linear, BitFit, SSF), masks, optimisers,
checkpoints, run folders, sweeps, soups and merges, and the multi-process launcher."""

from training.config import RunConfig, RunError
from training.run_folder import CheckpointRun, Run, load_run, trajectory
from training.soups import (
    GreedyReport,
    InterpolationSweep,
    LearnedReport,
    check_ingredients,
    dare,
    greedy,
    interpolate,
    learned,
    recompute_batch_stats,
    sweep_interpolation,
    task_arithmetic,
    ties,
    uniform,
)

__all__ = [
    "CheckpointRun",
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
    "trajectory",
    "uniform",
]
