"""Tokenizer folders of three families, and rows that stress templating (tests of templating and of
`ChatTokenizer`)."""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ["byte-level BPE, ChatML", "Metaspace BPE, Zephyr", "SmolLM2 (GGUF)"]

ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TRICKY_ROWS = [
    {"prompt": "Why is the sky blue?", "chosen": "Light scatters.", "rejected": "It is paint."},
    {"prompt": "  spaced  ", "chosen": " leading space", "rejected": "\nleading newline"},
    {"prompt": "Ünïcödé — ok?", "chosen": "ß and 漢字.", "rejected": "emoji 🙂 end"},
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "First?"},
            {"role": "assistant", "content": "One."},
            {"role": "user", "content": "Second question, longer than the first one?"},
        ],
        "chosen": "Two, as asked.",
        "rejected": "<|im_start|> is not a tag here",
    },
    {"prompt": "tail", "chosen": "assistant\nassistant", "rejected": "</s> inside"},
]


def metaspace_tokenizer(tmp_path):
    """A sentencepiece-style BPE (Metaspace pre-tokenizer, ▁ for spaces) with Zephyr's template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rust = Tokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    corpus = [json.dumps(row, ensure_ascii=False) for row in TRICKY_ROWS] * 20 + [
        TRICKY_ROWS[0]["prompt"]
    ] * 20
    rust.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=ZEPHYR
    )
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def tokenizer_folder(family: str, tiny_model_dir: Path, tmp_path: Path) -> str:
    """A saved tokenizer of `family` (one of FAMILIES): the tiny model's, a Metaspace one, or SmolLM2's."""
    if family.startswith("SmolLM2"):
        from transformers import AutoTokenizer

        from spo_ray.models.gguf import find_smollm2_gguf

        gguf = find_smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name)
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.save_pretrained(tmp_path)
        return str(tmp_path)
    if family.startswith("Metaspace"):
        return metaspace_tokenizer(tmp_path)
    return str(tiny_model_dir)
