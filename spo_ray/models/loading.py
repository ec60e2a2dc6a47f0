"""Resolve and load the policy and its frozen reference: HF folders, GGUF files, the tiny model, LoRA."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from spo_ray.errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def resolve_model_dir(model_cfg, work_dir: str | os.PathLike) -> str:
    """A Hugging Face folder for `model.path`: builds the tiny model or converts a GGUF file once."""
    work_dir = Path(work_dir)
    if model_cfg.path == "tiny":
        out = work_dir / "tiny_model"
        if not (out / "config.json").exists():
            from spo_ray.models.tiny import build_tiny_model

            t = model_cfg.tiny
            build_tiny_model(
                out,
                seed=t.seed,
                vocab_size=t.vocab_size,
                hidden_size=t.hidden_size,
                num_layers=t.num_layers,
                intermediate_size=t.intermediate_size,
            )
        return str(out)
    if model_cfg.path == "smollm2" or str(model_cfg.path).endswith(".gguf"):
        from spo_ray.models.gguf import convert_gguf_to_hf, find_smollm2_gguf

        gguf = find_smollm2_gguf() if model_cfg.path == "smollm2" else model_cfg.path
        out = work_dir / "base_model"
        if not (out / "config.json").exists():
            convert_gguf_to_hf(gguf, out)
        return str(out)
    if not (Path(model_cfg.path) / "config.json").exists():
        raise ConfigError(
            "model.path", f"'{model_cfg.path}' is not a Hugging Face model folder (no config.json)"
        )
    return str(model_cfg.path)


def load_causal_lm(path: str, dtype: str = "float32", attn_implementation: str = "auto") -> torch.nn.Module:
    """A causal LM from a local HF folder; `attn_implementation` other than 'auto' picks the attention kernel."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True, **kwargs)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass (train.gradient_checkpointing).

    Non-reentrant checkpointing: gradients reach LoRA adapters and frozen embeddings need no requires_grad."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False  # a KV cache is useless in training and HF warns about it here


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy_and_reference(
    model_cfg,
    policy_dir: str,
    reference_dir: str | None = None,
    need_reference: bool = True,
    mixed_precision: bool = False,
):
    """(policy, reference or None, reference_mode or None).

    Trainable weights are float32 master weights whatever `model.dtype` says: an AdamW step of lr·g below a
    bfloat16 weight's precision (≈ |w|/256) would round to nothing. Frozen weights keep `model.dtype`: the
    reference, and with LoRA the base model when `mixed_precision` (bf16 autocast) can run it.
    Without LoRA the reference is a frozen copy of `reference_dir` (default: the starting policy). With LoRA
    (`model.lora.r > 0`) and no other reference, `reference_mode()` disables the adapter around a forward; a
    `reference_dir` other than `policy_dir` (iterative rounds anchor the KL at π_0) loads a frozen copy.
    `need_reference=False` (nothing in the run reads the reference) loads no copy at all.
    """
    lora = model_cfg.lora
    base_dtype = model_cfg.dtype if lora.r > 0 and mixed_precision else "float32"
    attn = model_cfg.attn_implementation
    policy = load_causal_lm(policy_dir, base_dtype, attn)
    separate_reference = bool(reference_dir) and os.path.abspath(reference_dir) != os.path.abspath(policy_dir)
    if lora.r > 0:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(
            policy,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            ),
            autocast_adapter_dtype=True,  # adapters in float32 over a half-precision base
        )
        if not separate_reference:
            return policy, None, policy.disable_adapter
    if not need_reference:
        return policy, None, None
    reference = load_causal_lm(reference_dir or policy_dir, model_cfg.dtype, attn)
    reference.requires_grad_(False).eval()
    return policy, reference, None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
