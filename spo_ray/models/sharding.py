"""Full (unsharded) state dicts of a model that may be sharded over ranks (FSDP2) or replicated (DDP).

Reading or loading the full weights of an FSDP2 model is a collective: every rank must call these functions
in the same order, or the ranks deadlock. They call PyTorch's distributed state-dict API for every model,
sharded or not, distributed or not, so one code path serves a single process, DDP and FSDP alike.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def _gather_options(cpu_offload: bool) -> StateDictOptions:
    # full_state_dict all-gathers DTensor shards; cpu_offload hands the result to rank 0 only, on the CPU
    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_model_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """Every rank calls this; with `cpu_offload` rank 0 gets the full weights on the CPU and the other ranks
    an empty dict, without it every rank gets them on its device. Names are the unwrapped model's."""
    return get_model_state_dict(model, options=_gather_options(cpu_offload))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every rank calls this; rank 0 gets the optimizer's full state keyed by parameter name, others {}."""
    return get_optimizer_state_dict(model, optimizer, options=_gather_options(True))


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP-style (`.module`) and torch.compile (`._orig_mod`) wrappers (FSDP2 wraps nothing)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list, list]:
    """Load full weights into `model` (each rank keeps its shard); every rank calls it with the full dict.

    Loads nothing and returns the (missing, unexpected) names when they differ from the model's own; else
    ([], []). `state` is consumed (its tensors may be replaced by shards)."""
    own = list(unwrap_model(model).state_dict())  # local under FSDP2: the names, no gathering
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in set(own)]
    if missing or unexpected:
        return missing, unexpected
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    return [], []


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state written by `full_optimizer_state_dict`; every rank calls it with the full dict."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
