"""Preference data: reading, schema normalization, chat templates, tokenization, Ray Data pipeline."""
