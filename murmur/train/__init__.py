"""Training: the loop (trainer), the parallel layout (parallel), checkpoints, optimizers and metrics."""
