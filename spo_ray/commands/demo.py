"""`spo-ray demo`: the embedded default: online SPO vs DPO (β = α, and β = 0.1) on the synthetic expert task."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from spo_ray.commands.config import add_config_arguments
from spo_ray.config import load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def run(args: argparse.Namespace) -> int:
    from spo_ray.tasks.synthetic_expert.job import format_expert_table, run_job

    config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(config_path, args.overrides)
    if cfg.task.name != "synthetic_expert":
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name="synthetic_expert"))
    root = Path(args.output_dir).resolve()
    runs = {"spo": cfg}
    if args.compare_dpo:
        # Same data, reference and budget; DPO has no global regularizer, so it runs offline. At β = α both
        # optima put the same temperature on r (softmax(r/α) vs π_ref·exp(r/β)), so only π_ref tells them
        # apart; β = 0.1 is TRL's default.
        for name, beta in (("dpo", cfg.loss.alpha), ("dpo_beta0.1", 0.1)):
            dpo = dataclasses.replace(cfg.loss, name="dpo", beta=beta, kl_coef=0.0)
            runs[name] = dataclasses.replace(cfg, loss=dpo)
    summaries = {}
    for name, run_cfg in runs.items():
        run_cfg = dataclasses.replace(
            run_cfg, output=dataclasses.replace(run_cfg.output, dir=str(root / name))
        )
        summaries[name] = run_job(run_cfg, task_root=root / "shared")
    print("\n" + format_expert_table(list(summaries.values()), list(summaries)))
    print(f"target: softmax(r/alpha), alpha={cfg.loss.alpha}; plots in {root}/*/distributions.png")
    (root / "demo_summary.json").write_text(json.dumps(summaries, indent=1))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="online SPO vs DPO (β = α and β = 0.1) on the synthetic expert task (tiny model, CPU)"
    )
    add_config_arguments(parser)
    parser.add_argument("--output-dir", default="outputs/demo", help="where both runs write their results")
    parser.add_argument("--no-dpo", dest="compare_dpo", action="store_false", help="run SPO only")
    parser.set_defaults(run=run)
