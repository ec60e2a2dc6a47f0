"""`spo-ray generate`: sample responses from a model with the rollout pool and write them as JSONL."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from spo_ray.config import RolloutConfig
from spo_ray.errors import UserError


def read_prompts(path: str | os.PathLike) -> list[Any]:
    """Prompts from .jsonl (objects with 'prompt': text, chat messages or token ids) or text, one per line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompts file '{path}' does not exist (cwd: {os.getcwd()})")
    prompts: list[Any] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix not in (".jsonl", ".json"):
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else row
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise UserError(f'{path}:{number}: no \'prompt\' field (expected {{"prompt": "..."}})')
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"prompts file '{path}' holds no prompts")
    return prompts


def run(args: argparse.Namespace) -> int:
    import ray
    from tqdm import tqdm

    from spo_ray.rollout import RolloutPool
    from spo_ray.rollout.pool import check_model_path

    check_model_path(args.model)
    prompts = read_prompts(args.prompts)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, log_to_driver=args.verbose, configure_logging=args.verbose)
    engine_options = (
        {"max_model_len": args.max_model_len} if args.max_model_len and args.backend == "vllm" else {}
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with RolloutPool(
            args.model,
            num_actors=args.num_actors,
            backend=args.backend,
            num_cpus_per_actor=args.cpus_per_actor,
            seed=args.seed,
            timeout_s=args.timeout,
            **engine_options,
        ) as pool:
            start = time.perf_counter()
            batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
            settings = {"n": args.n, "max_tokens": args.max_tokens, "temperature": args.temperature}
            pending = [pool.generate_async(batch, top_p=args.top_p, **settings) for batch in batches]
            tokens = 0
            with out.open("w", encoding="utf-8") as fh, tqdm(total=len(prompts), unit="prompt") as bar:
                for batch_index, request in enumerate(pending):
                    for offset, samples in enumerate(request.result()):
                        for sample_index, sample in enumerate(samples):
                            row = {
                                "prompt_index": batch_index * args.batch_size + offset,
                                "sample_index": sample_index,
                                "prompt": sample.prompt,
                                "response": sample.text,
                                "prompt_token_ids": sample.prompt_token_ids,
                                "token_ids": sample.token_ids,
                                "logprobs": sample.logprobs,
                                "finish_reason": sample.finish_reason,
                                "policy_version": sample.policy_version,
                            }
                            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                            tokens += len(sample.token_ids)
                        bar.update(1)
            seconds = time.perf_counter() - start
    finally:
        if started_ray:
            ray.shutdown()
    print(
        f"wrote {len(prompts) * args.n} samples for {len(prompts)} prompts to {out} "
        f"({tokens} tokens in {seconds:.1f} s, {tokens / max(seconds, 1e-9):.0f} tokens/s)"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = RolloutConfig()
    parser = subparsers.add_parser("generate", help="sample responses with vLLM (or HF) and write JSONL")
    parser.add_argument("--model", required=True, help="a Hugging Face model folder")
    parser.add_argument(
        "--prompts", required=True, help="JSONL with a 'prompt' per line (text, messages or ids), or .txt"
    )
    parser.add_argument("--out", required=True, help="output JSONL, one row per sample")
    parser.add_argument("--n", type=int, default=2, help="samples per prompt")
    parser.add_argument(
        "--max-tokens", type=int, default=defaults.max_tokens, help="max new tokens per sample"
    )
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 samples greedily")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass")
    parser.add_argument("--backend", choices=["vllm", "hf"], default=defaults.backend)
    parser.add_argument("--num-actors", type=int, default=defaults.num_actors, help="rollout engines")
    parser.add_argument("--cpus-per-actor", type=float, default=defaults.num_cpus_per_actor)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="same seed, same samples")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per engine call")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="prompts per request (progress granularity)"
    )
    parser.add_argument("--max-model-len", type=int, default=0, help="vLLM context length; 0: the model's")
    parser.add_argument("--verbose", action="store_true", help="show engine logs")
    parser.set_defaults(run=run)
