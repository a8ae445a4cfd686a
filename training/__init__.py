"""training: producing new weights — fine-tuning (full, linear, BitFit, SSF), masks, optimisers,
checkpoints, run folders, sweeps, soups and merges, and the multi-process launcher."""

from training.run_config import RunConfig, RunError
from training.run_folder import Run, load_run

__all__ = ["Run", "RunConfig", "RunError", "load_run"]
