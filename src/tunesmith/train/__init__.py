"""The training loop and its numerical pieces (packing, loss, schedules, checkpoints)."""
