"""Rollout engines, one per Ray actor: vLLM, and the transformers.generate fallback."""

from __future__ import annotations

from spo_ray.rollout.engines.base import RolloutEngine


def engine_class(backend: str) -> type[RolloutEngine]:
    """The engine class for a backend name ('vllm' or 'hf')."""
    if backend == "vllm":
        from spo_ray.rollout.engines.vllm_engine import VllmEngine

        return VllmEngine
    if backend == "hf":
        from spo_ray.rollout.engines.hf_engine import HfEngine

        return HfEngine
    raise ValueError(f"unknown rollout backend {backend!r}: use 'vllm' or 'hf'")
