"""`logging:` and `output:`: metrics, progress and where results go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spo_ray.config.fields import option


@dataclass
class LoggingConfig:
    level: Literal["warning", "info", "debug"] = option(
        "warning",
        "console verbosity: 'warning' shows the progress bar, the run's own lines and real warnings (known-benign "
        "library warnings are listed and dropped in spo_ray/logs.py); 'info'/'debug' show every library line "
        "(also `spo-ray --verbose`)",
    )
    wandb_mode: Literal["offline", "online", "disabled"] = option(
        "offline", "Weights & Biases mode; offline writes to the output dir"
    )
    wandb_project: str = option("spo_ray", "Weights & Biases project")
    log_every: int = option(1, "write metrics every this many steps", ge=1)
    progress: bool = option(True, "show progress bars on the console")
    samples_every: int = option(
        0,
        "every this many steps write a few of the policy's online samples to samples.jsonl and a wandb Table "
        "(needs the rollout: loss.kl_coef > 0, loss.kl_on=online); 0: off",
        ge=0,
    )
    num_samples: int = option(
        4, "samples logged each logging.samples_every steps (rank 0's first ones)", ge=1
    )
    row_trace: bool = option(
        False,
        "write the example ids each rank trains on at every optimizer step to rows_rank<r>.jsonl "
        "(an audit that a resumed run trains the same rows as an uninterrupted one)",
    )


@dataclass
class OutputConfig:
    dir: str = option(
        "outputs/run",
        "output dir: checkpoints, metrics.jsonl, summary.json, final/; a local path or a filesystem URI "
        "(file://, s3://, gs://, ...) that every node can reach (README: Output locations)",
    )
