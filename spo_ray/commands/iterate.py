"""`spo-ray iterate`: iterative online rounds (SPO pairs / best-of-n / ranked, or SPPO self-play)."""

from __future__ import annotations

import argparse

from spo_ray.commands.config import add_config_arguments, load_run_config


def format_rounds(rounds: list[dict]) -> str:
    """A console table of the per-round metrics (exact expert columns when the task has them)."""

    def cell(value, width: int) -> str:
        return f"{value:>{width}.4f}" if isinstance(value, float) else f"{'-':>{width}}"

    exact = "expert_expected_reward" in rounds[0]
    head = f"{'round':>5} {'win vs prev':>11} {'win vs ref':>10} {'judge score':>11} {'entropy':>8}"
    head += f" {'E[r] exact':>10} {'TV':>7} {'H exact':>7}" if exact else ""
    lines = [head]
    for r in rounds:
        line = (
            f"{r['round']:>5} {cell(r.get('win_rate_vs_previous'), 11)} {cell(r.get('win_rate_vs_reference'), 10)}"
            f" {cell(r.get('expected_reward'), 11)} {cell(r.get('entropy'), 8)}"
        )
        if exact:
            line += (
                f" {cell(r['expert_expected_reward'], 10)} {cell(r['expert_tv_to_target'], 7)}"
                f" {cell(r['expert_entropy'], 7)}"
            )
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from spo_ray.api import iterate

    summary = iterate(load_run_config(args)).summary
    print(format_rounds(summary["rounds"]))
    print(f"final model: {summary['final_model']} ({summary['wall_seconds']:.1f}s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "iterate", help="iterative online alignment: generate, judge, train k steps, sync; repeat"
    )
    add_config_arguments(parser)
    parser.add_argument("--output-dir", help="output dir (same as --set output.dir=...); re-run to resume")
    parser.set_defaults(run=run)
