"""Rollout: vLLM actors, the HF-generate fallback, weight-sync transports."""
