"""How the models spread over the workers (DDP or FSDP2, `train.strategy`) and the per-step collectives.

The device is a parameter everywhere (`ray.train.torch.get_device()`: a GPU with NCCL, the CPU with gloo), so
a CPU run executes the same lines as a GPU run. Under FSDP2 (`torch.distributed.fsdp.fully_shard`) each
decoder layer and the root hold a 1/W shard of the parameters, gradients and optimizer state; the frozen
reference is sharded the same way. Full weights are gathered on every rank (`spo_ray.models.sharding`).
"""

from __future__ import annotations

import contextlib

import ray.train.torch
import torch
from torch import nn


def _fully_shard(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 over every rank: one group per transformer block (`_no_split_modules`), then the root."""
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def prepare_policy(policy: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The trainable policy on `device`, wrapped in DDP or sharded with FSDP2 (`train.strategy`)."""
    if strategy == "fsdp":
        # Ray's prepare_model(parallel_strategy="fsdp") is FSDP1 on GPUs only, without per-block groups
        return _fully_shard(ray.train.torch.prepare_model(policy, parallel_strategy=None), device)
    return ray.train.torch.prepare_model(policy, parallel_strategy="ddp")


def prepare_reference(reference: nn.Module | None, strategy: str, device: torch.device) -> nn.Module | None:
    """The frozen reference on `device`; under FSDP sharded like the policy (it forwards on every rank)."""
    if reference is None:
        return None
    reference.requires_grad_(False).eval()
    return _fully_shard(reference, device) if strategy == "fsdp" else reference.to(device)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip to a global L2 norm over every rank's gradients and return that norm.

    Under FSDP2 the gradients are DTensor shards: the norm is reduced over the shards (`full_tensor`), so
    every rank scales by the same global factor; under DDP the gradients are already all-reduced."""
    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)


def gradient_sync(model: nn.Module, enabled: bool):
    """Context of a backward that reduces gradients across ranks (enabled) or only accumulates them."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only at the last micro-batch
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
