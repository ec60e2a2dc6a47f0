"""`spo-ray extrapolate`: ExPO weights θ_aligned + λ·(θ_aligned − θ_sft), or the best λ of a judged grid.

With `--weight λ` it writes one model. With `--grid 0,0.25,0.5` it writes each λ's model to a scratch
folder, evaluates it, keeps the best as `--out` and writes `grid.json` there. Evaluation is exact on the
synthetic expert task (`task.name: synthetic_expert` + `--task task.json`: π on S(x) by teacher
forcing, best by the judge's exact expected score); otherwise samples from one rollout pool (each λ's
weights synced into it) are scored by `judge.name`: mean score for scoring judges, win rate against
λ = 0 for pairwise judges.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from spo_ray.commands.config import add_config_arguments
from spo_ray.errors import ConfigError, UserError


def parse_grid(text: str) -> list[float]:
    """'0,0.25,0.5,1' -> [0.0, 0.25, 0.5, 1.0]; UserError on a non-number or a repeat."""
    weights = []
    for item in text.split(","):
        try:
            weight = float(item)
        except ValueError:
            raise UserError(
                f"--grid: {item.strip()!r} is not a number (expected e.g. 0,0.25,0.5,1)"
            ) from None
        if not math.isfinite(weight):
            raise UserError(f"--grid: {item.strip()!r} is not a finite number")
        if weight in weights:
            raise UserError(f"--grid: λ = {weight:g} is listed twice")
        weights.append(weight)
    return weights


# ---------------------------------------------------------------------------------------------------
# The grid


def format_table(rows: list[dict], columns: tuple, best_index: int | None) -> str:
    """One line per λ: its metrics, the judge's failure counts (when judged), and a marker on the best."""
    header = f"{'λ':>7} " + " ".join(f"{title:>12}" for _, title in columns)
    judged = any("failures" in row for row in rows)
    lines = [header + ("  failures" if judged else "")]
    for index, row in enumerate(rows):
        cells = []
        for key, _ in columns:
            value = row.get(key)
            cells.append(f"{'—':>12}" if value is None else f"{value:>12.4g}")
        line = f"{row['weight']:>7g} " + " ".join(cells)
        if judged:
            failures = ", ".join(f"{k}: {v}" for k, v in row["failures"].items()) or "0"
            line += f"  {failures}"
        lines.append(line + ("  <- best" if index == best_index else ""))
    return "\n".join(lines)


def run_grid(args: argparse.Namespace) -> int:
    """Evaluate every λ of --grid, save the best λ's model as --out, write grid.json there, print a table."""
    from tqdm import tqdm

    from spo_ray.config import load_config
    from spo_ray.eval.expo_grid import JudgeEvaluator, TaskEvaluator
    from spo_ray.models.extrapolate import WeightFolder, check_compatible, check_output_dir, extrapolate

    weights = parse_grid(args.grid)
    cfg = load_config(args.config, args.overrides)
    check_compatible(WeightFolder.open(args.sft, "--sft"), WeightFolder.open(args.aligned, "--aligned"))
    out = check_output_dir(args.out, args.sft, args.aligned)  # before any λ is evaluated
    task = None
    if args.task:
        from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask

        if not Path(args.task).is_file():
            raise UserError(f"--task '{args.task}' does not exist (the task.json that spo-ray train writes)")
        task = SyntheticExpertTask.load(args.task)
    if cfg.task.name != "none":
        if task is None:
            raise ConfigError(
                "task.name", f"{cfg.task.name} evaluates exactly: pass --task OUTPUT_DIR/task/task.json"
            )
        evaluator: Any = TaskEvaluator(task, cfg.loss.alpha)
    else:
        evaluator = JudgeEvaluator(cfg, task, args.aligned, verbose=args.verbose)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix=".expo-grid-", dir=out.parent) as scratch:
            bar = tqdm(weights, unit="λ", disable=not cfg.logging.progress)
            for version, weight in enumerate(bar, start=1):
                bar.set_postfix(weight=weight)
                folder = extrapolate(args.sft, args.aligned, weight, Path(scratch) / f"weight_{version}")
                rows.append({"weight": weight, **evaluator.evaluate(folder, weight, version)})
                shutil.rmtree(folder)
    finally:
        evaluator.close()
    scored = [i for i, row in enumerate(rows) if row[evaluator.metric] is not None]
    best = max(scored, key=lambda i: rows[i][evaluator.metric]) if scored else None
    if best is not None:
        extrapolate(args.sft, args.aligned, rows[best]["weight"], out)
    else:
        out.mkdir(parents=True, exist_ok=True)
    summary = {
        "sft": str(Path(args.sft).resolve()),
        "aligned": str(Path(args.aligned).resolve()),
        "metric": evaluator.metric,
        "best_weight": None if best is None else rows[best]["weight"],
        "grid": rows,
    }
    (out / "grid.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_table(rows, evaluator.columns, best))
    if best is None:
        raise UserError(f"the judge gave no verdict for any λ (failures are in {out / 'grid.json'})")
    print(f"best λ = {rows[best]['weight']:g} by {evaluator.metric}; wrote {out} and {out / 'grid.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from spo_ray.api import extrapolate

    if args.grid is not None:
        return run_grid(args)
    if args.config or args.overrides or args.task:
        raise UserError("--config, --set and --task only apply with --grid (they choose how λ is evaluated)")
    out = extrapolate(args.sft, args.aligned, args.weight, args.out)
    print(
        f"wrote {out}: θ_aligned + {args.weight:g}·(θ_aligned − θ_sft) of '{args.aligned}' and '{args.sft}'"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extrapolate", help="ExPO: write θ_aligned + λ·(θ_aligned − θ_sft), or pick the best λ of a grid"
    )
    parser.add_argument("--sft", required=True, help="the SFT model folder (the starting point of alignment)")
    parser.add_argument("--aligned", required=True, help="the aligned model folder (fine-tuned from --sft)")
    strength = parser.add_mutually_exclusive_group(required=True)
    strength.add_argument("--weight", type=float, help="λ: > 0 extrapolates, 0 is aligned, -1 is sft")
    strength.add_argument("--grid", help="comma-separated λ values to evaluate, e.g. 0,0.25,0.5,1")
    parser.add_argument(
        "--out", required=True, help="output model folder (with --grid: the best λ + grid.json)"
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--task", help="synthetic expert task.json (from spo-ray train) for exact evaluation or its judge"
    )
    parser.add_argument("--verbose", action="store_true", help="show engine logs")
    parser.set_defaults(run=run)
