"""bench/cost_model.py's arithmetic against real models: its parameter counts are the numel of a transformers
model with the same shapes, its forward FLOPs are what torch's FlopCounterMode counts in that model's
forward, and its LoRA size is what PEFT builds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cost_model import LLAMA_31_8B, Shape, Step, sync_bytes  # noqa: E402

TINY = {
    "vocab": 1000,
    "hidden": 128,
    "intermediate": 352,
    "layers": 2,
    "heads": 2,
    "kv_heads": 1,
    "head_dim": 64,
}


def tiny_model(qwen: bool, tied: bool):
    common = dict(
        vocab_size=TINY["vocab"],
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["intermediate"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        head_dim=TINY["head_dim"],
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    if qwen:
        return Qwen2ForCausalLM(Qwen2Config(**common, attn_implementation="eager"))
    return LlamaForCausalLM(LlamaConfig(**common, attn_implementation="eager"))


@pytest.mark.parametrize("qwen,tied", [(False, False), (False, True), (True, False)])
def test_parameter_count_and_forward_flops_match_a_real_model(qwen, tied):
    shape = Shape("tiny", **TINY, tied=tied, qkv_bias=qwen)
    model = tiny_model(qwen, tied).eval()
    assert shape.params() == sum(p.numel() for p in model.parameters())

    rows, seq_len = 3, 37
    ids = torch.randint(0, TINY["vocab"], (rows, seq_len))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)  # the LM head at every position
    assert shape.forward_flops(seq_len, seq_len, rows) == counter.get_total_flops()

    # the head at only some positions: what the step's LM-head hook leaves
    head = 2 * TINY["hidden"] * TINY["vocab"] * rows * (seq_len - 5)
    assert shape.forward_flops(seq_len, 5, rows) == counter.get_total_flops() - head


def test_lora_size_is_what_peft_builds_on_every_linear_layer():
    from peft import LoraConfig, get_peft_model

    shape = Shape("tiny", **TINY)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(tiny_model(False, False), LoraConfig(r=8, target_modules=targets))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.lora_params(8) == trained


def test_the_preference_step_counts_each_prompt_once_and_spo_reads_no_reference():
    from cost_model import step_flops

    step = Step(pairs=4, prompt=100, response=50, samples=0)
    spo, dpo = (
        step_flops(LLAMA_31_8B, step),
        step_flops(LLAMA_31_8B, Step(**{**step.__dict__, "loss": "dpo"})),
    )
    assert spo["tokens_per_step"] == 4 * 200 and spo["padded_tokens_per_step"] == 2 * 4 * 150
    one_forward = LLAMA_31_8B.forward_flops(200, 100, 4)
    assert spo["preference"] == 4 * one_forward  # forward, backward (2), checkpointed recompute
    assert dpo["preference"] == 5 * one_forward  # and the reference forward
    sizes = sync_bytes(LLAMA_31_8B)
    full, adapter = (
        sizes["full, float32 master weights (what is sent today)"],
        sizes["LoRA r=8 adapter, float32"],
    )
    assert full / adapter > 300  # all-linear r=8 on an 8B model: about 0.26% of the weights
