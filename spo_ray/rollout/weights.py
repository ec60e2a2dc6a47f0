"""What a trainer sends to the rollout engines: the state dict (unwrapped, LoRA merged, HF parameter names), or
with `rollout.lora_sync=adapter` the LoRA adapter alone (PEFT's saved names and config), plus its base once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spo_ray.errors import UserError
from spo_ray.models.sharding import full_model_state_dict, unwrap_model


@dataclass
class LoraAdapter:
    """One LoRA adapter as PEFT saves it: `tensors` under adapter_model.safetensors names, `config` the
    adapter_config.json contents. vLLM engines started with `enable_lora` serve it on top of their base."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]


def _lora_merged(
    model: nn.Module, state: dict[str, torch.Tensor], merge: bool = True
) -> dict[str, torch.Tensor]:
    """Base weights plus the active adapters' deltas (W + scale * B @ A), from the PEFT model's full state
    dict `state` (which the sharded model may not hold anywhere); `merge=False`: the base weights alone.
    The model is not modified."""
    from peft.tuners.lora import Embedding, LoraLayer
    from peft.utils.other import transpose

    prefix = "base_model.model."  # PeftModel's names of the base model's tensors
    state = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
    deltas: dict[str, torch.Tensor] = {}
    for module_name, module in model.get_base_model().named_modules() if merge else []:
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


def lora_sync_payload(
    model: nn.Module, with_base: bool, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], LoraAdapter | None]:
    """(base weights or {}, the active LoRA adapter) for `RolloutPool.sync_weights(base, version, lora=...)`.

    The base is the frozen, unmerged base under HF names (send it once per run, so the engines' base is the
    trainer's); the adapter is what changes. Under torch.distributed every rank calls it (one collective
    gather); rank 0 gets the payload, the others ({}, None).
    """
    from peft.tuners.lora import LoraLayer

    model = unwrap_model(model)
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        raise UserError("rollout.lora_sync=adapter needs a LoRA model (model.lora.r > 0)")
    (adapter,) = model.active_adapters if len(model.active_adapters) == 1 else (None,)
    config = model.peft_config.get(adapter) if adapter else None
    layers = [m for m in model.get_base_model().modules() if isinstance(m, LoraLayer)]
    if (
        config is None
        or getattr(config, "use_dora", False)
        or getattr(config, "modules_to_save", None)
        or any(adapter in getattr(m, "lora_embedding_A", {}) for m in layers)
    ):
        raise UserError(
            "rollout.lora_sync=adapter: vLLM serves one plain LoRA adapter on linear layers; this model has "
            f"{'several or no active adapters' if config is None else 'DoRA, modules_to_save or embedding LoRA'}"
            "; set rollout.lora_sync=merged"
        )
    state = full_model_state_dict(model, cpu_offload=True)
    if not state:
        return {}, None
    tensors = {
        name.replace(f".lora_A.{adapter}.", ".lora_A.").replace(f".lora_B.{adapter}.", ".lora_B."): (
            tensor.detach().to(device).contiguous()
        )
        for name, tensor in state.items()
        if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name
    }
    saved = json.loads(
        json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )
    base = _lora_merged(model, state, merge=False) if with_base else {}
    return {n: t.to(device).contiguous() for n, t in base.items()}, LoraAdapter(tensors, saved)
