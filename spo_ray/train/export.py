"""Write the trained policy as a Hugging Face folder (weights + tokenizer + chat template); LoRA is merged."""

from __future__ import annotations

import os
from pathlib import Path

from spo_ray.models.loading import DTYPES, load_policy_and_reference, load_tokenizer
from spo_ray.train.checkpointing import load_model_weights


def export_final_model(
    model_cfg, model_dir: str, checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """Load the checkpoint's weights (every tensor, strictly) into the starting architecture, merge LoRA, and
    save a plain HF folder in `model.dtype`."""
    out = Path(out_dir)
    policy, _, _ = load_policy_and_reference(model_cfg, model_dir, model_dir, need_reference=False)
    load_model_weights(policy, checkpoint_dir)
    if model_cfg.lora.r > 0:
        policy = policy.merge_and_unload()
    policy.to(DTYPES[model_cfg.dtype]).save_pretrained(out, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(out)
    return out
