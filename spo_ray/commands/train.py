"""`spo-ray train`: run a training job from a config (resumes when the output dir has checkpoints)."""

from __future__ import annotations

import argparse
import json

from spo_ray.commands.config import add_config_arguments, load_run_config


def run(args: argparse.Namespace) -> int:
    from spo_ray.api import train

    summary = train(load_run_config(args)).summary
    print(
        json.dumps(
            {k: summary[k] for k in ("steps", "resumed_from_step", "wall_seconds", "pairs_per_second")},
            indent=1,
        )
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a policy with SPO (or any registry loss) on Ray Train"
    )
    add_config_arguments(parser)
    parser.add_argument("--output-dir", help="output dir (same as --set output.dir=...); re-run to resume")
    parser.set_defaults(run=run)
