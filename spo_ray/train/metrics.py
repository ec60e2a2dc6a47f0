"""Metrics sinks on rank 0: `metrics.jsonl`, Weights & Biases (offline by default), a console progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

PROGRESS_KEYS = ("loss", "kl_k1", "accuracy", "pairs_per_s")


class MetricsLogger:
    """Writes one JSON line per logged step; on resume, drops lines past the resumed step first."""

    def __init__(
        self,
        output_dir: str,
        logging_cfg,
        run_config: dict,
        total_steps: int,
        start_step: int,
        desc: str = "train",
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self.log_every = logging_cfg.log_every
        self.progress = (
            tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
            if logging_cfg.progress
            else None
        )
        self.wandb_run = None
        if logging_cfg.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:  # wandb is a core dependency; tolerate its absence on stripped installs
                wandb = None
            if wandb is not None:
                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb_run = wandb.init(
                    project=logging_cfg.wandb_project,
                    mode=logging_cfg.wandb_mode,
                    dir=str(self.path.parent),
                    config=run_config,
                    resume="allow",
                    id=_stable_run_id(self.path.parent),
                )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        if self.progress is not None:
            self.progress.update(step - self.progress.n)
            self.progress.set_postfix({k: f"{metrics[k]:.4g}" for k in PROGRESS_KEYS if k in metrics})
        if step % self.log_every:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _stable_run_id(output_dir: Path) -> str:
    import hashlib

    return "spo-" + hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:12]


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
