"""Write the trained policy as a Hugging Face folder (weights + tokenizer + chat template); LoRA is merged
(and, by default, also saved on its own as a PEFT adapter folder)."""

from __future__ import annotations

import os
import tempfile

from spo_ray import storage
from spo_ray.models.loading import DTYPES, load_policy_and_reference, load_tokenizer
from spo_ray.training.checkpointing import load_model_weights


def export_final_model(
    model_cfg,
    model_dir: str,
    checkpoint_dir: str | os.PathLike | storage.RemotePath,
    out_dir: str | os.PathLike | storage.RemotePath,
    adapter_dir: str | os.PathLike | storage.RemotePath | None = None,
) -> storage.AnyPath:
    """Load the checkpoint's weights (every tensor, strictly) into the starting architecture, merge LoRA, and
    save a plain HF folder in `model.dtype`. Either folder may be remote (`spo_ray.storage`): the checkpoint
    is downloaded first, the export written locally and uploaded. With LoRA and `adapter_dir`, the adapter
    alone (float32, unmerged) is also saved there as a PEFT folder."""
    out = storage.location(out_dir)
    policy, _, _ = load_policy_and_reference(model_cfg, model_dir, model_dir, need_reference=False)
    with storage.local_copy(checkpoint_dir) as local_checkpoint:
        load_model_weights(policy, local_checkpoint)
    if model_cfg.lora.r > 0:
        if adapter_dir is not None:
            _save(policy, storage.location(adapter_dir))  # adapter_config.json + adapter_model.safetensors
        policy = policy.merge_and_unload()
    _save(policy.to(DTYPES[model_cfg.dtype]), out, load_tokenizer(model_dir))
    return out


def _save(model, out: storage.AnyPath, tokenizer=None) -> None:
    """`save_pretrained` into `out`, written locally and uploaded when `out` is remote."""
    with tempfile.TemporaryDirectory(prefix="spo_ray_final_") as tmp:
        local_out = tmp if storage.is_remote(out) else out
        model.save_pretrained(local_out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(local_out)
        if storage.is_remote(out):
            storage.remove_tree(out)  # no file of an earlier export survives next to this one
            storage.upload_dir(tmp, out)
