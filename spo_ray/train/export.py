"""Write the trained policy as a Hugging Face folder (weights + tokenizer + chat template); LoRA is merged."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file

from spo_ray.models.loading import load_policy_and_reference, load_tokenizer
from spo_ray.train.checkpointing import MODEL_FILE


def export_final_model(
    model_cfg, model_dir: str, checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """Load the checkpoint's weights into the starting architecture and save a plain HF folder."""
    out = Path(out_dir)
    policy, _, _ = load_policy_and_reference(model_cfg, model_dir, model_dir)
    policy.load_state_dict(load_file(str(Path(checkpoint_dir) / MODEL_FILE)), strict=False)
    if model_cfg.lora.r > 0:
        policy = policy.merge_and_unload()
    policy.save_pretrained(out, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(out)
    return out
