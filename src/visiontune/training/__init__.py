"""The training run: set-up, strategies, schedule, the epoch loops, the LR finder and the end-of-run files."""
