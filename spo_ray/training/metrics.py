"""Metrics sinks on rank 0: `metrics.jsonl`, Weights & Biases (offline by default), a console progress bar.

With a remote output dir (`spo_ray.storage`) the JSON-lines files are appended in a local staging folder and
uploaded whole by `sync()` (object stores cannot append): the loop syncs before each checkpoint, so the
remote file always covers the newest checkpoint a resume can start from."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from spo_ray import storage

EVAL_PREFIX = "eval/"  # evaluation metrics (training/evaluation.py) carry it in metrics.jsonl
PROGRESS_KEYS = ("loss", "kl_k1", "accuracy", "pairs_per_s")
PROGRESS_EVAL_KEYS = ("eval/loss", "eval/rewards/accuracies")  # shown from the latest evaluation on
SAMPLE_COLUMNS = ("step", "policy_version", "prompt", "completion", "finish_reason")


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
        self.file = StagedJsonl(output_dir, "metrics.jsonl", start_step)
        self.path = self.file.local
        # samples.jsonl: the policy's own samples every logging.samples_every steps (log_samples)
        self.samples = (
            StagedJsonl(output_dir, "samples.jsonl", start_step) if logging_cfg.samples_every else None
        )
        self.last_eval: dict[str, float] = {}
        self.write_error: str | None = (
            None  # set when the disk filled up; the loop stops at its next checkpoint
        )
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

    def log(self, step: int, metrics: dict) -> None:
        """One step's metrics; a step with `eval/*` metrics is written whatever logging.log_every says."""
        self.last_eval.update({k: metrics[k] for k in PROGRESS_EVAL_KEYS if k in metrics})
        if self.progress is not None:
            self.progress.update(step - self.progress.n)
            shown = {k: metrics[k] for k in PROGRESS_KEYS if k in metrics} | self.last_eval
            self.progress.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        has_eval = any(k.startswith(EVAL_PREFIX) for k in metrics)
        if step % self.log_every and not has_eval:
            return
        self.write_error = self.write_error or self.file.append(json.dumps({"step": step, **metrics}))
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Rows of SAMPLE_COLUMNS: one line each in samples.jsonl, and one wandb Table `samples` per call."""
        if self.samples is None or not rows:
            return
        for row in rows:
            self.write_error = self.write_error or self.samples.append(json.dumps(row))
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(
                columns=list(SAMPLE_COLUMNS), data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows]
            )
            self.wandb_run.log({"samples": table}, step=step)

    def sync(self) -> None:
        """Make the output dir's metrics.jsonl (and samples.jsonl) hold every line so far (an upload when remote)."""
        self.file.sync()
        if self.samples is not None:
            self.samples.sync()

    def close(self) -> None:
        self.sync()
        if self.progress is not None:
            self.progress.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step` (a resumed run logs the later ones again); a torn line (a write
    cut off by a crash or a full disk) is dropped with a note instead of failing every later resume."""
    if not path.exists():
        return
    kept, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            torn += 1
            continue
        if row is not None and row.get("step", 0) <= step:
            kept.append(line)
    if torn:
        print(f"{path}: dropped {torn} unreadable line(s), cut off by a crash or a full disk", flush=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class StagedJsonl:
    """A JSON-lines file of the output dir: appended in place when local; when remote, appended to a local copy
    (in `storage.work_dir`) that `sync()` uploads whole. Opening it drops lines past `start_step` (a resume)."""

    def __init__(self, output_dir, name: str, start_step: int):
        out = storage.location(output_dir)
        self.target = out / name
        if storage.is_remote(out):
            self.local = storage.work_dir(out) / "staged" / name
            self.local.parent.mkdir(parents=True, exist_ok=True)
            if self.target.exists():
                self.local.write_bytes(self.target.read_bytes())
            else:
                self.local.unlink(missing_ok=True)
        else:
            self.local = self.target
            self.local.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl_after(self.local, start_step)
        self.synced = not storage.is_remote(out)  # a remote copy is first uploaded at the first line
        if storage.is_remote(out):
            self.sync()

    def append(self, line: str) -> str | None:
        error = append_line(self.local, line)
        if not self.synced:  # the first line upload tells the driver a step landed (FirstStepWatch)
            self.sync()
            self.synced = True
        return error

    def sync(self) -> None:
        if self.local != self.target and self.local.exists():
            self.target.write_bytes(self.local.read_bytes())


class RowTrace:
    """`rows_rank<r>.jsonl`: the example ids this rank trained on at each optimizer step (logging.row_trace)."""

    def __init__(self, output_dir: str, rank: int, start_step: int):
        self.file = StagedJsonl(output_dir, f"rows_rank{rank}.jsonl", start_step)
        self.path = self.file.local
        self.write_error: str | None = None

    def log(self, step: int, example_ids: list[int]) -> None:
        self.write_error = self.write_error or self.file.append(
            json.dumps({"step": step, "ids": example_ids})
        )

    def sync(self) -> None:
        """Make the output dir's copy hold every line logged so far (an upload when remote)."""
        self.file.sync()


def append_line(path: Path, line: str) -> str | None:
    """Append one line; on a full disk return what failed instead of raising (other errors raise)."""
    try:
        with path.open("a") as fh:
            fh.write(line + "\n")
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return f"writing {path}: {exc.strerror}"
    return None


def read_row_trace(output_dir: str | os.PathLike, rank: int = 0) -> dict[int, list[int]]:
    """step -> example ids of one rank's trace; the last line of a step wins."""
    path = storage.location(output_dir) / f"rows_rank{rank}.jsonl"
    return {row["step"]: row["ids"] for row in _read_jsonl(path)}


def _read_jsonl(path: storage.AnyPath) -> list[dict]:
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn line; the next resume drops it
            continue
    return rows


def _stable_run_id(output_dir: Path) -> str:
    import hashlib

    return "spo-" + hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:12]


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    return _read_jsonl(storage.location(output_dir) / "metrics.jsonl")


def read_samples(output_dir: str | os.PathLike) -> list[dict]:
    """The rows of samples.jsonl (logging.samples_every): SAMPLE_COLUMNS."""
    return _read_jsonl(storage.location(output_dir) / "samples.jsonl")
