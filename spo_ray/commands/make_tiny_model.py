"""`spo-ray make-tiny-model OUT`: build the embedded tiny Llama + tokenizer."""

from __future__ import annotations

import argparse
import json

from spo_ray.models.tiny import build_tiny_model


def run(args: argparse.Namespace) -> int:
    out = build_tiny_model(
        args.out,
        seed=args.seed,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        intermediate_size=args.intermediate_size,
    )
    info = json.loads((out / "spo_ray_tiny.json").read_text())
    print(f"wrote {out} ({info['parameters']:,} parameters, vocab {args.vocab_size}, seed {args.seed})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-tiny-model", help="build the small Llama + BPE tokenizer used offline"
    )
    parser.add_argument("out", help="output folder (a Hugging Face model folder)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same model and tokenizer")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=128, help="a multiple of 64 (head_dim 64)")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.set_defaults(run=run)
