"""`rollout:`: online sampling, engine placement and weight sync."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spo_ray.config.fields import option


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = option(
        "vllm", "generation engine: vLLM, or the transformers.generate fallback"
    )
    num_actors: int = option(1, "rollout actors (each one engine)", ge=1)
    num_cpus_per_actor: float = option(1.0, "Ray CPUs reserved by each rollout actor", ge=0)
    num_gpus_per_actor: float = option(0.0, "Ray GPUs reserved by each rollout actor", ge=0)
    colocate: bool = option(
        True,
        "prefer the node of the trainers' rank 0 for rollout actors (soft: engines the driver started elsewhere "
        "move there when training starts); false spreads them over the cluster",
    )
    resources: dict[str, float] = option(
        {},
        "custom Ray resources each rollout actor needs, e.g. {rollout: 1}: engines run only on nodes started "
        "with them (`ray start --resources '{\"rollout\": 4}'`)",
    )
    node_labels: dict[str, str] = option(
        {},
        "Ray node labels each rollout actor needs, e.g. {pool: rollout}: engines run only on nodes started "
        "with them (`ray start --labels pool=rollout`)",
    )
    transport: Literal["object_store", "nccl", "cuda_ipc"] = option(
        "object_store", "weight-sync transport: Ray object store (everywhere) or vLLM's GPU engines"
    )
    prompts_per_step: int = option(4, "regularization prompts sampled for each optimizer step", ge=0)
    samples_per_prompt: int = option(1, "online samples generated per regularization prompt", ge=1)
    max_tokens: int = option(32, "max new tokens per online sample", ge=1)
    temperature: float = option(
        1.0, "sampling temperature (1.0 samples the policy itself, as the KL needs)", gt=0
    )
    top_p: float = option(1.0, "nucleus sampling mass (1.0 for unbiased KL samples)", gt=0, le=1)
    sync_every: int = option(
        1, "sync trainer weights to the rollout actors every this many optimizer steps", ge=1
    )
    max_policy_lag: int = option(
        2, "max optimizer steps between the sampling weights and the trained weights", ge=0
    )
    importance_clip: float = option(
        0.0, "truncated importance weights min(c, pi/pi_old) per token; 0 turns them off", ge=0
    )
    overlap: bool = option(True, "request the next step's samples while the current step computes")
    async_sync: bool = option(
        True,
        "object-store syncs: rank 0 queues the new weights and trains on; each engine flips to them between two "
        "generations (samples keep exact version stamps, max_policy_lag still holds). false: wait for every "
        "engine to load before the next step",
    )
    seed: int = option(0, "engine seed: samples reproducible for a seed, different across requests")
    timeout_s: float = option(300.0, "timeout of any remote rollout call before the actor is replaced", gt=0)
    cpu_weights: Literal["in_place", "packed", "shared"] = option(
        "in_place",
        "vLLM CPU engines: in_place = linear layers compute on their loaded weights and a sync copies into them "
        "(SmolLM2: whole sync 0.29 s); shared = as in_place, but weights that load whole (embedding, LM head, "
        "norms, o/down projections) are served straight from the object store, not copied (each engine then "
        "holds its version's objects in the store); packed = vLLM's oneDNN-packed weights, 11-15% faster "
        "generation, but every sync reloads and repacks the model (0.57 s). GPU engines ignore it",
    )
    gpu_memory_utilization: float = option(0.3, "vLLM GPU memory fraction (GPU build only)", gt=0, le=1)
    lora_sync: Literal["auto", "adapter", "merged"] = option(
        "auto",
        "with model.lora.r > 0, what a weight sync sends: 'adapter' only the LoRA adapter (vLLM engines started "
        "with enable_lora, the frozen base once per run), 'merged' the whole merged model; 'auto' is adapter "
        "on backend=vllm, merged on hf",
    )
