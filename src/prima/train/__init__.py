"""Training: run configuration, the accelerate trainer, atomic checkpoints with exact resume, data and curves."""
