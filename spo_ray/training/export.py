"""Write the trained policy as a Hugging Face folder (weights + tokenizer + chat template); LoRA is merged."""

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
) -> storage.AnyPath:
    """Load the checkpoint's weights (every tensor, strictly) into the starting architecture, merge LoRA, and
    save a plain HF folder in `model.dtype`. Either folder may be remote (`spo_ray.storage`): the checkpoint
    is downloaded first, the export written locally and uploaded."""
    out = storage.location(out_dir)
    policy, _, _ = load_policy_and_reference(model_cfg, model_dir, model_dir, need_reference=False)
    with storage.local_copy(checkpoint_dir) as local_checkpoint:
        load_model_weights(policy, local_checkpoint)
    if model_cfg.lora.r > 0:
        policy = policy.merge_and_unload()
    with tempfile.TemporaryDirectory(prefix="spo_ray_final_") as tmp:
        local_out = tmp if storage.is_remote(out) else out
        policy.to(DTYPES[model_cfg.dtype]).save_pretrained(local_out, safe_serialization=True)
        load_tokenizer(model_dir).save_pretrained(local_out)
        if storage.is_remote(out):
            storage.remove_tree(out)  # no file of an earlier export survives next to this one
            storage.upload_dir(tmp, out)
    return out
