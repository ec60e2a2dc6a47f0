"""Resumable checkpoints: model (safetensors), optimizer, scheduler, per-rank RNG, data position, policy version.

`CheckpointStore` is the one place that decides which checkpoint is the latest complete one: the driver
starts the data stream from it and every worker restores its weights from it, so the two never disagree.
A checkpoint is complete when its manifest (written last, sizes and SHA-256 of rank 0's files) verifies.
The store, `checkpoint_problem` and `read_state` take a local folder or a remote one (`spo_ray.storage`); saving
and loading work on a local folder (Ray Train uploads a saved one; workers download the one they load).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from spo_ray import storage
from spo_ray.errors import UserError
from spo_ray.models.sharding import (
    full_model_state_dict,
    full_optimizer_state_dict,
    load_full_model_state_dict,
    load_full_optimizer_state_dict,
)

STATE_FILE = "train_state.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.pt"
DEGREE_FILE = "degree_head.pt"  # loss.sspo_lambda's head and its optimizer (training/degree.py)
MANIFEST_FILE = "manifest.json"  # written last: its presence and matching hashes make a checkpoint complete


@dataclass
class TrainState:
    """Where training stands; everything needed to continue with the next unseen example."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    consumed_in_epoch: int = 0  # examples of `epoch` already trained on, across all ranks
    policy_version: int = 0  # version of the weights last synced to the rollout actors
    alpha: float = 0.0  # SPO's α as loss.target_entropy adapted it (0: not adapted, loss.alpha holds)


def capture_rng() -> dict:
    """This process's random states as tensors and plain values only (what `torch.load(weights_only=True)` reads)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss_next,
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds pickled objects other than tensors and plain values: it is not loaded."""


def load_tensors_only(path: Path):
    """`torch.load` that refuses pickled code: tensors, numbers, strings and containers of them only.

    Anyone who can write the checkpoint folder could otherwise run code in every worker that loads it."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds pickled objects other than tensors and plain values, which "
            "spo_ray never writes (written by something else, or by an spo_ray older than this one?); "
            f"delete this checkpoint folder or restore the file from a trusted copy. torch.load said: {str(exc)[:300]}"
        ) from None


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's full state dict as contiguous CPU tensors (shared storage split).

    A collective under FSDP: every rank calls it; rank 0 gets the tensors, the other ranks an empty dict."""
    state = full_model_state_dict(model)
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}


def save_checkpoint(
    directory: str | os.PathLike, *, rank: int, model, optimizer, scheduler, state: TrainState, degree=None
) -> None:
    """Write this rank's part of a checkpoint; rank 0 writes the shared parts (model, optimizer, state, and the
    degree head of loss.sspo_lambda when `degree` is given: its own file, so MODEL_FILE stays the causal LM).

    Every rank calls it: gathering full weights and optimizer state from FSDP shards is a collective."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = trainable_state_dict(model)
    optimizer_state = full_optimizer_state_dict(model, optimizer)
    torch.save(capture_rng(), directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    save_file(weights, str(directory / MODEL_FILE))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, directory / OPTIM_FILE)
    (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    if degree is not None:
        degree.save(directory)
    write_manifest(directory, state.step)


def checkpoint_bytes(model: torch.nn.Module, optimizer) -> int:
    """About what `save_checkpoint` writes: the model's full state plus the optimizer's tensors."""
    module = getattr(model, "module", model)
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    moments = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    return weights + moments


def space_shortfall(directory: str | os.PathLike, needed: int) -> str | None:
    """None when the filesystem holding `directory` has room for `needed` bytes (plus 5% and 1 MiB); for a
    remote `directory`, the local temp dir each checkpoint is written to before it is uploaded."""
    directory = Path(tempfile.gettempdir()) if storage.is_remote(directory) else Path(directory)
    while not directory.exists():
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    if free >= needed * 1.05 + (1 << 20):
        return None
    return f"a checkpoint needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free"


def _sha256(path: storage.AnyPath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """Record size and SHA-256 of rank 0's files, then fsync and atomically rename the manifest into place."""
    names = [MODEL_FILE, OPTIM_FILE, STATE_FILE, "rng_rank0.pt"]
    names += [name for name in (DEGREE_FILE,) if (directory / name).exists()]
    files = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for name in names
    }
    for name in names:  # the data must be on disk before the manifest that vouches for it
        with (directory / name).open("rb") as fh:
            os.fsync(fh.fileno())
    tmp = directory / (MANIFEST_FILE + ".tmp")
    with tmp.open("w") as fh:
        json.dump({"step": step, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(directory / MANIFEST_FILE)


def checkpoint_problem(directory: str | os.PathLike, hashes: bool = True) -> str | None:
    """None when `directory` is a complete checkpoint; otherwise what is missing or damaged.

    `hashes=False` checks the manifest and the sizes only (a save cut off), not the SHA-256 (a damaged file):
    reading every byte is what the driver does once per run, not what each worker repeats after each save."""
    directory = storage.location(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (the save was cut off before it finished)"
    except (OSError, ValueError) as exc:
        return f"unreadable {MANIFEST_FILE}: {exc}"
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        if not path.exists():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest says {expected['bytes']}"
        if hashes and _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint's MODEL_FILE into the model (every rank, under FSDP each keeps its shard); every
    tensor name must match both ways."""
    path = Path(directory) / MODEL_FILE
    missing, unexpected = load_full_model_state_dict(model, load_file(str(path)))
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not match the model it is loaded into: {len(missing)} missing tensors "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}; was it written with another "
            "model.path or model.lora setting?"
        )


def load_checkpoint(
    directory: str | os.PathLike, *, rank: int, model, optimizer, scheduler, degree=None
) -> TrainState:
    """Restore model, optimizer, scheduler, this rank's RNG and the degree head (`degree`, when given; a
    checkpoint saved without one leaves the fresh head); return the saved TrainState.

    Every rank calls it and reads the full files (loading into FSDP shards is a collective). Only tensors and
    plain values are unpickled: a file holding anything else raises `UnsafeCheckpointError`, naming it."""
    directory = Path(directory)
    load_model_weights(model, directory)
    optim_state = load_tensors_only(directory / OPTIM_FILE)
    load_full_optimizer_state_dict(model, optimizer, optim_state["optimizer"])
    scheduler.load_state_dict(optim_state["scheduler"])
    if degree is not None and not degree.load(directory, load_tensors_only):
        print(
            f"{directory}: no {DEGREE_FILE} (saved with loss.sspo_lambda=0); the degree head starts fresh",
            flush=True,
        )
    rng_file = directory / f"rng_rank{rank}.pt"  # ranks > 0 are not in rank 0's manifest: may be cut off
    try:
        restore_rng(load_tensors_only(rng_file))
    except FileNotFoundError:
        pass
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 (only dropout and sampling seeds are at stake, not the data position)
        print(f"{rng_file}: unreadable ({exc}); rank {rank} continues with fresh random state", flush=True)
    return TrainState(**json.loads((directory / STATE_FILE).read_text()))


def read_state(directory: str | os.PathLike | storage.RemotePath) -> TrainState:
    return TrainState(**json.loads((storage.location(directory) / STATE_FILE).read_text()))


_CHECKPOINT_FILES = (STATE_FILE, MODEL_FILE, OPTIM_FILE, DEGREE_FILE, MANIFEST_FILE, MANIFEST_FILE + ".tmp")


class CheckpointStore:
    """The checkpoints of one run folder: which is the latest complete one, and pruning the rest.

    Ray Train writes each checkpoint into its own folder under `root/<ray run>/`; a folder counts only when its
    manifest verifies (`checkpoint_problem`). Folders Ray never recorded (a driver killed mid-save) are
    judged the same way, so the driver's data position and the workers' weights come from one answer.
    `root` may be a remote location (`spo_ray.storage`): folders are then `RemotePath`s, same semantics.
    """

    def __init__(self, root: str | os.PathLike | storage.RemotePath, hashes: bool = True):
        self.root = storage.location(root)
        self.hashes = hashes  # False: sizes only (see checkpoint_problem)

    def folders(self) -> list[storage.AnyPath]:
        """Every folder under root holding checkpoint files, complete or not."""
        found = []
        for directory, names in storage.walk_files(self.root):
            if any(name in _CHECKPOINT_FILES or name.startswith("rng_rank") for name in names):
                found.append(directory)
        return sorted(found)

    def complete(self) -> list[tuple[int, storage.AnyPath]]:
        """(step, folder) of every complete checkpoint, oldest first (ties: older folder first)."""
        done = []
        for folder in self.folders():
            if checkpoint_problem(folder, self.hashes) is None:
                done.append((read_state(folder).step, folder.stat().st_mtime, folder))
        return [(step, folder) for step, _, folder in sorted(done)]

    def latest(self) -> storage.AnyPath | None:
        """The newest complete checkpoint (highest step), or None when there is none."""
        done = self.complete()
        return done[-1][1] if done else None

    def prune(self, keep: int, log=print) -> list[tuple[int, storage.AnyPath]]:
        """Delete incomplete folders and all but the newest `keep` complete ones, saying why for each;
        return the (step, folder) kept, oldest first (one verification pass serves both).

        Call only while no save is in flight into this store (before or after a run, or on rank 0 right
        after its own save reported, which is the newest folder)."""
        complete = self.complete()
        kept = complete[-keep:]
        kept_folders, complete_folders = {f for _, f in kept}, {f for _, f in complete}
        for folder in self.folders():
            if folder in kept_folders:
                continue
            problem = None if folder in complete_folders else checkpoint_problem(folder, self.hashes)
            reason = (
                f"incomplete: {problem}"
                if problem
                else f"older than the newest {keep} (train.keep_checkpoints)"
            )
            log(f"removing checkpoint folder {folder} ({reason})")
            storage.remove_tree(folder)
        return kept

    def remove_finished_runs(self, current: str | None = None) -> None:
        """Delete the folders of earlier Ray runs (one per driver start) that no longer hold a checkpoint."""
        holding = {folder.relative_to(self.root).parts[0] for folder in self.folders()}
        for run in self.root.iterdir() if self.root.exists() else []:
            if run.is_dir() and run.name not in holding and run.name != current:
                storage.remove_tree(run)
