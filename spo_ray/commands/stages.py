"""`spo-ray stages`: Sequential Preference Optimization, one training stage per preference dimension."""

from __future__ import annotations

import argparse

from spo_ray.commands.config import add_config_arguments, load_run_config


def run(args: argparse.Namespace) -> int:
    from spo_ray.config import validate
    from spo_ray.iterative import run_stages

    summary = run_stages(validate(load_run_config(args), check_files=True))
    print(f"{'stage':>5} {'dimension':<16} {'steps':>6} {'final loss':>10}  model")
    for s in summary["stages"]:
        loss = f"{s['final_loss']:>10.4f}" if isinstance(s["final_loss"], float) else f"{'-':>10}"
        note = " (already trained)" if s["skipped"] else ""
        print(f"{s['stage']:>5} {s['dimension']:<16} {s['steps']!s:>6} {loss}  {s['model']}{note}")
    print(f"final model: {summary['final_model']} ({summary['wall_seconds']:.1f}s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stages",
        help="Sequential PO: train one preference dimension after another (stages.dimensions), each stage "
        "from the previous one's model; re-run to resume at the stage where it stopped",
    )
    add_config_arguments(parser)
    parser.add_argument("--output-dir", help="output dir (same as --set output.dir=...); re-run to resume")
    parser.set_defaults(run=run)
