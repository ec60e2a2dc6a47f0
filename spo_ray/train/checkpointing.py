"""Resumable checkpoints: model (safetensors), optimizer, scheduler, per-rank RNG, data position, policy version."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "train_state.json"
MODEL_FILE = "model.safetensors"


@dataclass
class TrainState:
    """Where training stands; everything needed to continue with the next unseen example."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    consumed_in_epoch: int = 0  # examples of `epoch` already trained on, across all ranks
    policy_version: int = 0  # version of the weights last synced to the rollout actors


def capture_rng() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's full state dict as contiguous CPU tensors (shared storage split)."""
    module = getattr(model, "module", model)
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in module.state_dict().items()}


def save_checkpoint(
    directory: str | os.PathLike, *, rank: int, model, optimizer, scheduler, state: TrainState
) -> None:
    """Write this rank's part of a checkpoint; rank 0 writes the shared parts (model, optimizer, state)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng(), directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    save_file(trainable_state_dict(model), str(directory / MODEL_FILE))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / "optim.pt"
    )
    (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint's MODEL_FILE into the (unwrapped) model; every tensor name must match both ways."""
    path = Path(directory) / MODEL_FILE
    module = getattr(model, "module", model)
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not match the model it is loaded into: {len(missing)} missing tensors "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}; was it written with another "
            "model.path or model.lora setting?"
        )


def load_checkpoint(directory: str | os.PathLike, *, rank: int, model, optimizer, scheduler) -> TrainState:
    """Restore model, optimizer, scheduler and this rank's RNG; return the saved TrainState."""
    directory = Path(directory)
    load_model_weights(model, directory)
    optim_state = torch.load(directory / "optim.pt", weights_only=False)
    optimizer.load_state_dict(optim_state["optimizer"])
    scheduler.load_state_dict(optim_state["scheduler"])
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        restore_rng(torch.load(rng_file, weights_only=False))
    return TrainState(**json.loads((directory / STATE_FILE).read_text()))


def read_state(directory: str | os.PathLike) -> TrainState:
    return TrainState(**json.loads((Path(directory) / STATE_FILE).read_text()))


def latest_checkpoint_dir(storage_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under a Ray Train run folder (by saved step), or None."""
    best, best_step = None, -1
    for state_file in Path(storage_dir).glob(f"**/{STATE_FILE}"):
        try:
            step = json.loads(state_file.read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
        if step > best_step and (state_file.parent / MODEL_FILE).exists():
            best, best_step = state_file.parent, step
    return best
