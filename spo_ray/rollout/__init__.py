"""Rollout: vLLM actors, the HF-generate fallback, weight-sync transports."""

from spo_ray.rollout.pool import PendingSamples, RolloutPool
from spo_ray.rollout.types import Prompt, RolloutError, Sample, SamplingSettings
from spo_ray.rollout.weights import state_dict_for_sync

__all__ = [
    "PendingSamples",
    "Prompt",
    "RolloutError",
    "RolloutPool",
    "Sample",
    "SamplingSettings",
    "state_dict_for_sync",
]
