"""`train:`: the Ray Train loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spo_ray.config.fields import option


@dataclass
class TrainConfig:
    num_workers: int = option(1, "Ray Train workers (DDP ranks)", ge=1)
    use_gpu: bool = option(False, "one GPU per worker; DDP over NCCL instead of gloo")
    cpus_per_worker: float = option(1.0, "Ray CPUs reserved by each training worker", gt=0)
    cluster_autoscales: bool = option(
        False,
        "the cluster adds nodes on demand: a run bigger than the cluster warns and waits instead of being refused",
    )
    strategy: Literal["ddp", "fsdp"] = option(
        "ddp", "data parallelism: DDP (replicas), or FSDP2 (parameters, gradients, optimizer state sharded)"
    )
    precision: Literal["fp32", "bf16"] = option(
        "fp32",
        "compute precision of the forwards: bf16 autocasts them (GPU or CPU); trainable weights stay float32 "
        "master weights and the loss math float32 either way",
    )
    max_steps: int = option(60, "optimizer steps to run", ge=1)
    batch_size: int = option(8, "preference examples per worker per micro-batch", ge=1)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", ge=1)
    lr: float = option(1e-3, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = option(0.9, "AdamW beta1 (decay of the gradient's running mean)", ge=0, lt=1)
    adam_beta2: float = option(0.95, "AdamW beta2 (decay of the squared gradient's running mean)", ge=0, lt=1)
    adam_epsilon: float = option(1e-8, "AdamW epsilon (added to the denominator)", gt=0)
    gradient_checkpointing: bool = option(
        False,
        "recompute activations in the backward pass instead of storing them: less memory, ~30% more compute",
    )
    warmup_steps: int = option(5, "linear warmup steps", ge=0)
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "learning-rate decay after warmup")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 turns clipping off", ge=0)
    seed: int = option(0, "seed for model init, dropout and data order")
    precompute_ref_logps: bool = option(
        False,
        "score the data with the reference once before training (offline dpo/ipo/cdpo/rdpo: no reference forward per step)",
    )
    reference_actors: int = option(
        0,
        "Ray Data actors that score the data once (precompute_ref_logps, SPPO's prev_logps), each with "
        "cpus_per_worker CPUs and a GPU when use_gpu; 0: one per training worker (num_workers)",
        ge=0,
    )
    checkpoint_every: int = option(
        20, "save a resumable checkpoint every this many steps; 0 only at the end", ge=0
    )
    keep_checkpoints: int = option(2, "keep the last k checkpoints", ge=1)
    eval_every: int = option(
        0,
        "evaluate on the eval rows (data.eval_files / eval_fraction) every this many steps; 0: only after "
        "the last step. Metrics eval/* (README: Metrics)",
        ge=0,
    )
    max_failures: int = option(
        2, "automatic restarts of a crashed worker group from the latest checkpoint", ge=0
    )
