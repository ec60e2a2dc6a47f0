"""The embedded tiny model: deterministic, a working tokenizer and chat template, loadable offline."""

from __future__ import annotations

import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spo_ray.models.tiny import build_tiny_model


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_for_a_seed(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json"):
        assert digest(again / name) == digest(tiny_model_dir / name)
    assert digest(other / "model.safetensors") != digest(tiny_model_dir / "model.safetensors")


def test_tiny_model_loads_offline_with_head_dim_64_and_a_chat_template(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    config = model.config
    assert config.head_dim == 64 and config.model_type == "llama"
    assert 300_000 <= sum(p.numel() for p in model.parameters()) <= 5_000_000
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert config.eos_token_id == tokenizer.eos_token_id and config.pad_token_id == tokenizer.pad_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why does the river move?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nWhy does the river move?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    odd = "héllo ✓ 🚀"
    assert tokenizer.decode(tokenizer(odd)["input_ids"]) == odd  # byte-level: any text round-trips
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config.vocab_size) and torch.isfinite(logits).all()
