"""Held-out evaluation (loss, perplexity, label accuracy and macro-F1, samples) and the run report."""
