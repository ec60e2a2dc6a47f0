"""The arithmetic task's hooks (spo_ray.tasks): write the splits; training on it goes through rounds."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from spo_ray.config import Config
from spo_ray.errors import ConfigError
from spo_ray.tasks.arithmetic.task import ArithmeticTask


def prepare(cfg: Config, out: Path) -> tuple[Config, ArithmeticTask]:
    """Write train/validation/test prompts into `out`/task; the rounds and the regularizer read train."""
    t = cfg.task
    task = ArithmeticTask.build(t.seed, t.num_prompts, t.num_heldout, t.operations)
    paths = task.write(out / "task")
    data = dataclasses.replace(cfg.data, reg_prompts_file=cfg.data.reg_prompts_file or str(paths["train"]))
    return dataclasses.replace(cfg, data=data), task


def run_job(cfg: Config, callbacks: Sequence = ()) -> dict:
    raise ConfigError(
        "task.name",
        "'arithmetic' has prompts and a judge, not preference pairs: run it with `spo-ray iterate` "
        "(configs/arithmetic_smollm2.yaml), which samples, judges and trains round by round",
    )
