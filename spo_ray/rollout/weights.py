"""The state dict a trainer sends to the rollout engines: unwrapped, LoRA merged, HF parameter names."""

from __future__ import annotations

import torch
from torch import nn

from spo_ray.errors import UserError
from spo_ray.models.sharding import full_model_state_dict, unwrap_model


def _lora_merged(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base weights plus the active adapters' deltas (W + scale * B @ A), from the PEFT model's full state
    dict `state` (which the sharded model may not hold anywhere); the model is not modified."""
    from peft.tuners.lora import Embedding, LoraLayer
    from peft.utils.other import transpose

    prefix = "base_model.model."  # PeftModel's names of the base model's tensors
    state = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
    deltas: dict[str, torch.Tensor] = {}
    for module_name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or module.merged or getattr(module, "disable_adapters", False):
            continue
        for adapter in module.active_adapters:
            if module.use_dora.get(adapter, False):
                raise UserError(f"{module_name}: DoRA adapters cannot be synced as merged weights yet")
            if adapter in module.lora_A:
                down, up = (state[f"{module_name}.lora_{ab}.{adapter}.weight"] for ab in "AB")
                fan_in_fan_out = module.fan_in_fan_out
            elif adapter in getattr(module, "lora_embedding_A", {}) and isinstance(module, Embedding):
                down, up = (state[f"{module_name}.lora_embedding_{ab}.{adapter}"] for ab in "AB")
                fan_in_fan_out = True
            else:
                continue
            if down.dim() != 2:
                raise UserError(
                    f"{module_name}: only Linear and Embedding LoRA adapters can be synced merged"
                )
            delta = transpose(up.float() @ down.float(), fan_in_fan_out) * module.scaling[adapter]
            key = f"{module_name}.weight"
            deltas[key] = deltas[key] + delta if key in deltas else delta
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".lora_" in name or ".original_module." in name:
            continue
        name = name.replace(".base_layer.", ".")
        for adapter in model.peft_config:
            name = name.replace(f".modules_to_save.{adapter}.", ".")
        tensor = tensor.detach()
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        merged[name] = tensor
    return merged


def state_dict_for_sync(
    model: nn.Module, device: str | torch.device | None = "cpu"
) -> dict[str, torch.Tensor]:
    """Weights for `RolloutPool.sync_weights`: HF names, LoRA adapters merged, contiguous tensors.

    Under torch.distributed every rank calls it (gathering FSDP shards is a collective): with a `device`
    rank 0 gets the weights and the other ranks an empty dict; `device=None` (GPU transports) gives every
    rank the full weights on its own device, and tensors may alias the model's parameters, so sync before
    the next optimizer step changes them.
    """
    model = unwrap_model(model)
    state = full_model_state_dict(model, cpu_offload=device is not None)
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        state = _lora_merged(model, state) if state else {}
    return {name: (t if device is None else t.to(device)).contiguous() for name, t in state.items()}
