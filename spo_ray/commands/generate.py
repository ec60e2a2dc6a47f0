"""`spo-ray generate`: sample responses from a model with the rollout pool and write them as JSONL."""

from __future__ import annotations

import argparse

from spo_ray.config import RolloutConfig


def run(args: argparse.Namespace) -> int:
    from spo_ray.api import generate

    generate(
        args.model,
        args.prompts,
        out=args.out,
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        backend=args.backend,
        num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor,
        seed=args.seed,
        timeout_s=args.timeout,
        batch_size=args.batch_size,
        max_model_len=args.max_model_len,
        verbose=args.verbose,
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
