"""Evaluation: distance to the expert distribution, entropy, win rate, plots."""
