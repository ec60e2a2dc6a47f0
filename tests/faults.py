"""Fault injection for training runs: start `spo-ray train` as its own process, SIGKILL it (and every process
it started: Ray's daemons and workers) at a chosen moment, and read what a run left on disk."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from spo_ray.training.checkpointing import MANIFEST_FILE, CheckpointStore
from spo_ray.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SPO_RAY = str(Path(sys.executable).parent / "spo-ray")

# An offline SPO run on the synthetic expert task: 12 steps, a checkpoint every 2, every step's rows traced.
FAULT_RUN = [
    "task.num_pairs=160",
    "task.reference_fit_steps=20",
    "loss.kl_coef=0",
    "train.batch_size=8",
    "train.max_steps=12",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "train.warmup_steps=1",
    "logging.progress=false",
    "logging.wandb_mode=disabled",
    "logging.row_trace=true",
]


def train_command(out_dir: Path, *extra: str) -> list[str]:
    sets = [arg for setting in [*FAULT_RUN, *extra] for arg in ("--set", setting)]
    return [
        SPO_RAY,
        "train",
        "--config",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        "--output-dir",
        str(out_dir),
        *sets,
    ]


def checkpoint_folders(out_dir: Path) -> list[Path]:
    return CheckpointStore(out_dir / "checkpoints").folders()


def _last_step(out_dir: Path) -> int:
    rows = read_metrics(out_dir)
    return rows[-1]["step"] if rows else 0


# Moments to kill at: each is a predicate over (out_dir, folders present at launch), polled every 5 ms.
def data_preparing(out_dir: Path, before: set) -> bool:
    return (out_dir / "data").exists() and not (out_dir / "metrics.jsonl").exists()


def checkpoint_folder_appeared(out_dir: Path, before: set) -> bool:
    """Right after a new checkpoint folder shows up: Ray has not recorded it yet, its files may be partial."""
    return bool(set(checkpoint_folders(out_dir)) - before)


def checkpoint_saved(out_dir: Path, before: set) -> bool:
    return any((folder / MANIFEST_FILE).exists() for folder in set(checkpoint_folders(out_dir)) - before)


def mid_step(out_dir: Path, before: set) -> bool:
    """Between checkpoints: a step past the last checkpoint (an odd step with checkpoint_every=2) was logged."""
    return _last_step(out_dir) % 2 == 1


def mid_step_after_a_checkpoint(out_dir: Path, before: set) -> bool:
    """A step past a saved checkpoint: step 3, 5, ... logged (with checkpoint_every=2, step 2's save is done)."""
    step = _last_step(out_dir)
    return step > 2 and step % 2 == 1


MOMENTS: dict[str, Callable[[Path, set], bool]] = {
    "data_preparing": data_preparing,
    "checkpoint_folder_appeared": checkpoint_folder_appeared,
    "checkpoint_saved": checkpoint_saved,
    "mid_step": mid_step,
    "mid_step_after_a_checkpoint": mid_step_after_a_checkpoint,
}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (Ray's GCS, raylet, workers), as a crash would."""
    with contextlib.suppress(psutil.NoSuchProcess):
        family = psutil.Process(proc.pid).children(recursive=True)
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    psutil.wait_procs(family, timeout=30)


def run_until(out_dir: Path, moment: str | None, log_path: Path, timeout: float = 900, *extra: str) -> dict:
    """Run the training command; with a `moment`, SIGKILL it when that moment comes. Returns what happened."""
    before = set(checkpoint_folders(out_dir))
    with open(log_path, "a") as log:
        log.write(f"\n===== run (kill at: {moment}) =====\n")
        log.flush()
        proc = subprocess.Popen(
            train_command(out_dir, *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"},
        )
        deadline = time.time() + timeout
        try:
            while proc.poll() is None and time.time() < deadline:
                if moment and MOMENTS[moment](out_dir, before):
                    kill_tree(proc)
                    return {"killed": True, "moment": moment, "step": _last_step(out_dir)}
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
    if proc.returncode != 0:
        raise AssertionError(f"run exited {proc.returncode}; see {log_path}:\n{log_path.read_text()[-3000:]}")
    return {"killed": False, "moment": moment, "summary": json.loads((out_dir / "summary.json").read_text())}
