"""The state dict a trainer sends to the rollout engines: unwrapped, LoRA merged, HF parameter names."""

from __future__ import annotations

import torch
from torch import nn

from spo_ray.errors import UserError


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP-style (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)  # FSDP2 DTensor shards gather here
    return full_tensor() if callable(full_tensor) else tensor


def _lora_merged(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights plus the active adapters' deltas (W + scale * B @ A); the model is not modified."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for module_name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.merged or getattr(module, "disable_adapters", False):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if module.use_dora.get(adapter, False):
                raise UserError(f"{module_name}: DoRA adapters cannot be synced as merged weights yet")
            delta = module.get_delta_weight(adapter).detach()
            key = f"{module_name}.weight"
            deltas[key] = deltas[key] + delta if key in deltas else delta
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue
        name = name.replace(".base_layer.", ".")
        for adapter in model.peft_config:
            name = name.replace(f".modules_to_save.{adapter}.", ".")
        tensor = _full(tensor.detach())
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        merged[name] = tensor
    return merged


def state_dict_for_sync(
    model: nn.Module, device: str | torch.device | None = "cpu"
) -> dict[str, torch.Tensor]:
    """Weights for `RolloutPool.sync_weights`: HF names, LoRA adapters merged, contiguous tensors.

    `device=None` keeps tensors where they are (GPU transports); tensors may alias the model's
    parameters when no copy is needed, so sync before the next optimizer step changes them.
    """
    model = unwrap_model(model)
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        state = _lora_merged(model)
    else:
        state = {name: _full(t.detach()) for name, t in model.state_dict().items()}
    return {name: (t if device is None else t.to(device)).contiguous() for name, t in state.items()}
