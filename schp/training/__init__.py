"""Training with self-correction: losses, learning-rate schedule, SCHP aggregation, the training loop."""
