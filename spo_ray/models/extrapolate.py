"""ExPO weak-to-strong extrapolation of weights: θ = θ_aligned + λ·(θ_aligned − θ_sft) (SPEC.md §2.4).

Pure file-to-file weights code (no Ray): both inputs are Hugging Face folders with safetensors weights
(one file or index + shards), the output is a folder of the same layout that transformers and vLLM load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from spo_ray.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files of the aligned folder not copied to the output: weights in any format (the output writes its own).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = (SAFETENSORS_INDEX, "pytorch_model.bin.index.json")
# Records of how the aligned model was made or scored: they do not describe the extrapolated weights.
NOT_COPIED = (
    "README.md",
    "expo.json",
    "grid.json",
    "fit_reference.json",
    "spo_ray_tiny.json",
    "trainer_state.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
)
# Config fields that must agree beyond the tensor shapes (same shapes can still mean another layout).
STRUCTURE_KEYS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


class ModelMismatchError(UserError):
    """The SFT and aligned folders are not the same architecture, so their weights cannot be combined."""


@dataclass
class WeightFolder:
    """A model folder's config and where each tensor lives: `files[name]` is the safetensors file."""

    path: Path
    config: dict
    files: dict[str, Path]

    @classmethod
    def open(cls, path: str | os.PathLike, label: str) -> WeightFolder:
        """Read config.json and the safetensors layout of `path`; `label` ('--sft', ...) names it in errors."""
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise UserError(
                f"{label} '{path}' is not a Hugging Face model folder (no config.json; cwd: {os.getcwd()})"
            )
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if (folder / SAFETENSORS_INDEX).is_file():
            weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
            files = {name: folder / shard for name, shard in weight_map.items()}
        elif (folder / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(folder / SINGLE_FILE, framework="pt") as handle:
                files = dict.fromkeys(handle.keys(), folder / SINGLE_FILE)
        else:
            raise UserError(
                f"{label} '{path}' has no safetensors weights ({SINGLE_FILE} or {SAFETENSORS_INDEX}); "
                "re-save it with model.save_pretrained(folder, safe_serialization=True)"
            )
        return cls(folder, config, files)

    def shapes(self) -> dict[str, list[int]]:
        """Tensor shapes by name, read from the file headers (no tensor is loaded)."""
        from safetensors import safe_open

        shapes: dict[str, list[int]] = {}
        for shard in sorted(set(self.files.values())):
            with safe_open(shard, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    shapes[name] = list(handle.get_slice(name).get_shape())
        return shapes


def check_compatible(sft: WeightFolder, aligned: WeightFolder) -> None:
    """Raise ModelMismatchError naming both folders and the first difference: model type or
    architectures, tensor names, tensor shapes, then the structural config fields."""

    def refuse(what: str) -> ModelMismatchError:
        return ModelMismatchError(
            f"cannot extrapolate: sft '{sft.path}' and aligned '{aligned.path}' {what}; ExPO needs the "
            "aligned model to be a fine-tune of the SFT model (same architecture, same tensors)"
        )

    for key in ("model_type", "architectures"):
        if sft.config.get(key) != aligned.config.get(key):
            raise refuse(f"differ in config '{key}': {sft.config.get(key)!r} vs {aligned.config.get(key)!r}")
    only_sft = sorted(set(sft.files) - set(aligned.files))
    only_aligned = sorted(set(aligned.files) - set(sft.files))
    if only_sft or only_aligned:
        name, where, other = (
            (only_sft[0], "sft", "aligned") if only_sft else (only_aligned[0], "aligned", "sft")
        )
        count = len(only_sft) + len(only_aligned)
        raise refuse(
            f"hold different tensors: '{name}' is in {where} but missing from {other} "
            f"({count} name(s) differ: {len(only_sft)} only in sft, {len(only_aligned)} only in aligned)"
        )
    sft_shapes, aligned_shapes = sft.shapes(), aligned.shapes()
    for name in sorted(aligned_shapes):
        if sft_shapes[name] != aligned_shapes[name]:
            raise refuse(
                f"differ in the shape of tensor '{name}': {sft_shapes[name]} in sft vs "
                f"{aligned_shapes[name]} in aligned"
            )
    for key in STRUCTURE_KEYS:
        if sft.config.get(key) != aligned.config.get(key):
            raise refuse(f"differ in config '{key}': {sft.config.get(key)!r} vs {aligned.config.get(key)!r}")


def extrapolated_tensor(aligned: torch.Tensor, sft: torch.Tensor, weight: float) -> torch.Tensor:
    """aligned + λ·(aligned − sft), computed in float32 (float64 if an input is) and cast to aligned's dtype.

    Integer and bool tensors (buffers, not weights) are aligned's, unchanged.
    """
    if not (aligned.is_floating_point() and sft.is_floating_point()):
        return aligned
    compute = torch.float64 if torch.float64 in (aligned.dtype, sft.dtype) else torch.float32
    aligned_c, sft_c = aligned.to(compute), sft.to(compute)
    return (aligned_c + weight * (aligned_c - sft_c)).to(aligned.dtype)


def check_weight(weight: float) -> float:
    """λ as a float; refuse NaN/inf, warn below −1 (past θ_sft, away from the aligned model).

    λ > 0 extrapolates (ExPO), λ = 0 is the aligned model, −1 ≤ λ < 0 interpolates toward θ_sft
    (λ = −1 is the SFT model itself): all meaningful, so only λ < −1 warns.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise UserError(
            f"--weight must be a finite number (λ in θ_aligned + λ·(θ_aligned − θ_sft)), got {weight!r}"
        )
    if weight < -1:
        warnings.warn(
            f"extrapolation weight {weight} < -1 moves past the SFT model, away from the aligned one",
            stacklevel=2,
        )
    return float(weight)


def check_output_dir(
    out_dir: str | os.PathLike, sft_dir: str | os.PathLike, aligned_dir: str | os.PathLike
) -> Path:
    """`out_dir` as a Path; UserError if it is a file or one of the input folders (it would be overwritten)."""
    out = Path(out_dir)
    for role, folder in (("sft", sft_dir), ("aligned", aligned_dir)):
        if out.exists() and out.resolve() == Path(folder).resolve():
            raise UserError(f"--out '{out_dir}' is the {role} folder; choose a new output folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out_dir}' is a file; choose a folder")
    return out


def extrapolate(
    sft_dir: str | os.PathLike,
    aligned_dir: str | os.PathLike,
    weight: float,
    out_dir: str | os.PathLike,
) -> Path:
    """Write θ_aligned + λ·(θ_aligned − θ_sft) to `out_dir` as a Hugging Face folder; returns its path.

    The folders are checked first (ModelMismatchError names the first difference). Weights are written
    shard by shard in aligned's layout and dtypes; λ = 0 copies aligned's tensors exactly. Tied
    embeddings stay tied: a tied model stores one tensor, and equal inputs give equal outputs. The other
    top-level files of the aligned folder (config, generation config, tokenizer, chat template, custom
    code) are copied, except NOT_COPIED records; `expo.json` records λ and the inputs. Stale weight files
    in `out_dir` are removed, other files there are left alone.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight = check_weight(weight)
    sft = WeightFolder.open(sft_dir, "--sft")
    aligned = WeightFolder.open(aligned_dir, "--aligned")
    check_compatible(sft, aligned)
    out = check_output_dir(out_dir, sft_dir, aligned_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file() and _is_weight_file(stale.name):
            stale.unlink()

    for shard in sorted(set(aligned.files.values())):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            for name in handle.keys():  # noqa: SIM118
                tensors[name] = handle.get_tensor(name)
        if weight != 0:
            for sft_shard in sorted({sft.files[name] for name in tensors}):
                with safe_open(sft_shard, framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118
                        if name in tensors:
                            tensors[name] = extrapolated_tensor(
                                tensors[name], handle.get_tensor(name), weight
                            )
        save_file(tensors, out / shard.name, metadata=metadata)
    for item in aligned.path.iterdir():
        if item.is_file() and not _is_weight_file(item.name) and item.name not in NOT_COPIED:
            shutil.copy2(item, out / item.name)
    if (aligned.path / SAFETENSORS_INDEX).is_file():
        shutil.copy2(aligned.path / SAFETENSORS_INDEX, out / SAFETENSORS_INDEX)
    provenance = {
        "formula": "theta_aligned + weight * (theta_aligned - theta_sft)",
        "weight": weight,
        "sft": str(sft.path.resolve()),
        "aligned": str(aligned.path.resolve()),
    }
    (out / "expo.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES


def read_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (one file or shards), by Hugging Face name."""
    from safetensors.torch import load_file

    folder = WeightFolder.open(model_dir, "model folder")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(folder.files.values())):
        state.update(load_file(shard))
    return state
