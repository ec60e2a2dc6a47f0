"""Models: loading policy/reference, LoRA, the tiny built-in model."""
