"""`spo-ray stages`: Sequential Preference Optimization (Lou et al., AAAI 2025) — one training stage per
preference dimension, in order, each starting from the previous stage's final model.

Layout of the output dir:

    DIR/stages/stage_K/train/   stage K's Ray Train run on the rows labelled `stages.dimensions[K-1]`
    DIR/summary.json            {"stages": [...], "final_model": ...}

Stage K trains with `model.path` = `model.reference_path` = stage K-1's final model (π_{K-1}; stage 1: the
configured model π_0), `data.dimension` = its dimension and, for `loss.name=seqpo`, `loss.seqpo_base_path`
= π_0, so the loss keeps the earlier dimensions' implicit reward (README: Sequential PO). As `spo-ray
iterate` does with its rounds, a stage whose `final/` exists is skipped and an unfinished one resumes from
its own checkpoints, so re-running the command continues at the stage where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

from spo_ray.config import Config, config_to_dict
from spo_ray.errors import ConfigError
from spo_ray.storage import local_output


def check_stages(cfg: Config) -> None:
    """The config rules of a staged run; ConfigError names the key."""
    dims = cfg.stages.dimensions
    if not dims:
        raise ConfigError(
            "stages.dimensions", "list the preference dimensions in order, e.g. [helpful, harmless]"
        )
    if len(set(dims)) != len(dims) or not all(d.strip() for d in dims):
        raise ConfigError("stages.dimensions", f"{dims} must be distinct, non-empty names")
    if cfg.stages.steps and len(cfg.stages.steps) != len(dims):
        raise ConfigError(
            "stages.steps",
            f"{len(cfg.stages.steps)} step counts for {len(dims)} dimensions: give one per stage",
        )
    if any(steps < 1 for steps in cfg.stages.steps):
        raise ConfigError("stages.steps", f"{cfg.stages.steps}: every stage needs at least one step")
    if cfg.task.name != "none":
        raise ConfigError(
            "task.name",
            "spo-ray stages trains on data files whose rows carry dimension labels; set task.name=none",
        )
    if cfg.data.dimension:
        raise ConfigError(
            "data.dimension", "spo-ray stages sets it per stage from stages.dimensions; leave it empty"
        )
    if cfg.model.reference_path:
        raise ConfigError(
            "model.reference_path", "each stage's reference is the previous stage's model; leave it empty"
        )


def stage_done(train_dir: Path) -> bool:
    """Whether a stage's training finished (its summary and final model exist)."""
    return (train_dir / "summary.json").exists() and (train_dir / "final" / "config.json").exists()


def run_stages(cfg: Config, callbacks: Sequence = ()) -> dict:
    """Run (or resume) one stage per `stages.dimensions`; write DIR/summary.json with the list `stages`."""
    from spo_ray.models.loading import resolve_model_dir
    from spo_ray.training.runner import run_training

    check_stages(cfg)
    started = time.perf_counter()
    out = local_output(cfg.output.dir, "spo-ray stages")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    base = resolve_model_dir(cfg.model, out)  # π_0
    current, records = base, []
    for number, dimension in enumerate(cfg.stages.dimensions, start=1):
        train_dir = out / "stages" / f"stage_{number}" / "train"
        skipped = stage_done(train_dir)
        if skipped:
            print(
                f"stage {number} ({dimension}): already trained, skipped ({train_dir / 'final'})", flush=True
            )
            summary = json.loads((train_dir / "summary.json").read_text())
        else:
            print(f"stage {number} ({dimension}): training from {current}", flush=True)
            summary = run_training(
                stage_config(cfg, number, dimension, current, base, train_dir), callbacks=callbacks
            )
        records.append(
            {
                "stage": number,
                "dimension": dimension,
                "start_model": current,
                "model": summary["final_model"],
                "steps": summary.get("steps"),
                "final_loss": summary.get("final_metrics", {}).get("pref_loss"),
                "skipped": skipped,
            }
        )
        current = summary["final_model"]
    result = {
        "stages": records,
        "final_model": current,
        "base_model": base,
        "loss": cfg.loss.name,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def stage_config(
    cfg: Config, number: int, dimension: str, current: str, base: str, train_dir: Path
) -> Config:
    """Stage `number`'s training config: from `current` (π_{number-1}, also its reference), on `dimension`."""
    steps = cfg.stages.steps[number - 1] if cfg.stages.steps else cfg.train.max_steps
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=current, reference_path=current),
        data=dataclasses.replace(cfg.data, dimension=dimension),
        loss=dataclasses.replace(cfg.loss, seqpo_base_path=base),
        train=dataclasses.replace(cfg.train, max_steps=steps),
        output=dataclasses.replace(cfg.output, dir=str(train_dir)),
    )
