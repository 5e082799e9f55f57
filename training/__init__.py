"""The training module: produces the checkpoints the server serves (TRAINING.md)."""
