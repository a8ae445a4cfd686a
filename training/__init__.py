"""training: producing new weights — pipelines, fine-tuning, masks, checkpoints, soups."""
