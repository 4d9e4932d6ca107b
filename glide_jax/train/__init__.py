"""Training: state, step, stage losses, optimizer, checkpoints and the loop (train.py)."""
