"""Training engine: trainer, checkpoints, fast paths."""
