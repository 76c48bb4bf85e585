"""Training recipes and what surrounds them: progress, metrics, checkpoints."""
