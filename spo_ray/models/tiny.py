"""The embedded tiny model: a small Llama with a locally trained byte-level BPE tokenizer.

Everything is built offline and deterministically from a seed, so tests and the CPU demo need no
model hub. head_dim is 64 because vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
HEAD_DIM = 64

# ChatML, the template SmolLM2 and many instruct models use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = ["the model", "a user", "the cat", "my friend", "the answer", "a robot", "the river", "this plan"]
_VERBS = ["likes", "writes", "finds", "needs", "explains", "prefers", "answers", "builds", "sees", "moves"]
_OBJECTS = [
    "a short poem",
    "the red apple",
    "clear code",
    "a good reason",
    "the blue sky",
    "fresh bread",
    "two numbers",
    "a kind reply",
    "the next step",
    "a long story",
]
_QUESTIONS = ["What is", "Why does", "How can", "Where is", "Which one is", "Tell me about", "Explain"]


def generated_corpus(seed: int, num_lines: int = 4000) -> list[str]:
    """A deterministic English-like corpus with chat turns, enough to train a small BPE."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        question = f"{rng.choice(_QUESTIONS)} {rng.choice(_OBJECTS)}? {rng.randint(0, 999)}"
        lines.append(
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{sentence.capitalize()}<|im_end|>"
        )
    return lines


def train_tokenizer(vocab_size: int, seed: int):
    """Train a byte-level BPE on the generated corpus; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generated_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 2,
    intermediate_size: int = 256,
) -> Path:
    """Write a tiny Llama + tokenizer as a Hugging Face folder that transformers and vLLM load offline."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % HEAD_DIM:
        raise ValueError(f"hidden_size must be a multiple of {HEAD_DIM} (vLLM CPU needs head_dim {HEAD_DIM})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size, seed)
    num_heads = hidden_size // HEAD_DIM
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "spo_ray_tiny.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "vocab_size": vocab_size,
                "hidden_size": hidden_size,
                "num_layers": num_layers,
                "intermediate_size": intermediate_size,
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            indent=2,
        )
        + "\n"
    )
    return out
