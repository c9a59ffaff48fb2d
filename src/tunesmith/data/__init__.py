"""Data preparation: read files into records, clean them, split them and audit the splits for leakage."""
