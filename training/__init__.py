"""The training module: produces the checkpoints the server serves (training/README.md)."""
