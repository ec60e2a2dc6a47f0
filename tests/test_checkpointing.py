"""Checkpoints are complete or ignored: a manifest written last vouches for rank 0's files; torn files and torn
metrics lines left by a crash or a full disk never block or mislead a resume."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from spo_ray.config import LoggingConfig, TrainConfig
from spo_ray.training.checkpointing import (
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIM_FILE,
    CheckpointStore,
    TrainState,
    UnsafeCheckpointError,
    checkpoint_problem,
    load_checkpoint,
    save_checkpoint,
    write_manifest,
)
from spo_ray.training.metrics import MetricsLogger, read_metrics
from spo_ray.training.optim import build_optimizer


def _save(model, folder, step):
    optimizer, scheduler = build_optimizer(model, TrainConfig(max_steps=10, warmup_steps=0))
    save_checkpoint(
        folder, rank=0, model=model, optimizer=optimizer, scheduler=scheduler, state=TrainState(step=step)
    )
    return optimizer, scheduler


def test_a_checkpoint_cut_off_by_a_full_disk_is_refused_and_pruned(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    store = CheckpointStore(tmp_path / "run")
    _save(model, store.root / "checkpoint_a", step=10)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    _save(model, store.root / "checkpoint_b", step=15)
    assert store.latest() == store.root / "checkpoint_b"

    # what a full disk left: train_state.json intact, model.safetensors truncated, optim.pt 0 bytes
    partial = store.root / "checkpoint_b"
    model_bytes = (partial / MODEL_FILE).read_bytes()
    (partial / MODEL_FILE).write_bytes(model_bytes[: len(model_bytes) // 2])
    (partial / OPTIM_FILE).write_bytes(b"")
    assert "model.safetensors has" in checkpoint_problem(partial)
    assert store.latest() == store.root / "checkpoint_a"

    # same sizes, different bytes: the hash catches it
    shutil.copytree(store.root / "checkpoint_a", store.root / "checkpoint_c")
    state = json.loads((store.root / "checkpoint_c" / "train_state.json").read_text())
    (store.root / "checkpoint_c" / "train_state.json").write_text(
        json.dumps({**state, "step": 20}, indent=1)
    )  # 10 -> 20
    assert "train_state.json does not match its SHA-256" in checkpoint_problem(store.root / "checkpoint_c")
    # a save cut off before its manifest
    (store.root / "checkpoint_d").mkdir()
    (store.root / "checkpoint_d" / "train_state.json").write_text(json.dumps({**state, "step": 25}))
    assert MANIFEST_FILE in checkpoint_problem(store.root / "checkpoint_d")
    assert store.latest() == store.root / "checkpoint_a"

    said = []
    kept = store.prune(keep=2, log=said.append)
    assert kept == [(10, store.root / "checkpoint_a")]
    assert sorted(line.split("/")[-1].split(" ")[0] for line in said) == [
        "checkpoint_b",
        "checkpoint_c",
        "checkpoint_d",
    ]
    assert [p.name for p in store.folders()] == ["checkpoint_a"]
    assert all("incomplete" in line for line in said) and len(said) == 3

    restored = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer, scheduler = build_optimizer(restored, TrainConfig(max_steps=10, warmup_steps=0))
    state = load_checkpoint(store.latest(), rank=0, model=restored, optimizer=optimizer, scheduler=scheduler)
    assert state.step == 10


def test_prune_keeps_the_newest_complete_checkpoints_by_step(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    store = CheckpointStore(tmp_path / "run")
    for name, step in [("checkpoint_x", 4), ("checkpoint_y", 2), ("checkpoint_z", 6)]:
        _save(model, store.root / name, step=step)
    store.prune(keep=2, log=lambda line: None)
    assert [step for step, _ in store.complete()] == [4, 6]


def test_a_torn_last_metrics_line_is_dropped_on_resume_instead_of_failing_it(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 6, "lo')  # cut off mid-write
    logging_cfg = LoggingConfig(progress=False, wandb_mode="disabled")
    logger = MetricsLogger(str(tmp_path), logging_cfg, {}, total_steps=10, start_step=4)
    logger.log(5, {"loss": 0.5})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
        (4, 0.25),
        (5, 0.5),
    ]


class _RunsCodeWhenUnpickled:
    """What a writer of the shared checkpoint folder could plant: unpickling calls open(marker, "w")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_files_holding_pickled_code_are_refused_naming_the_file(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    store = CheckpointStore(tmp_path / "run")
    for planted in (OPTIM_FILE, "rng_rank0.pt"):
        folder = store.root / f"checkpoint_{planted}"
        _save(model, folder, step=3)
        marker = tmp_path / f"code_ran_from_{planted}"
        original = torch.load(folder / planted, weights_only=True)
        torch.save({"payload": _RunsCodeWhenUnpickled(marker), **original}, folder / planted)
        write_manifest(folder, 3)  # the writer may fix up the manifest too: the checkpoint looks complete
        assert checkpoint_problem(folder) is None

        optimizer, scheduler = build_optimizer(model, TrainConfig(max_steps=10, warmup_steps=0))
        with pytest.raises(UnsafeCheckpointError, match=f"{folder / planted}: refused to load"):
            load_checkpoint(folder, rank=0, model=model, optimizer=optimizer, scheduler=scheduler)
        assert not marker.exists(), f"the object planted in {planted} ran its code"


def test_random_states_round_trip_through_a_tensors_only_checkpoint(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # numpy caches the second Gaussian of a pair: part of its state
    _save(model, tmp_path / "checkpoint", step=1)

    def draws():
        return random.random(), np.random.normal(), np.random.rand(), torch.rand(2).tolist()

    expected = draws()
    optimizer, scheduler = build_optimizer(model, TrainConfig(max_steps=10, warmup_steps=0))
    load_checkpoint(tmp_path / "checkpoint", rank=0, model=model, optimizer=optimizer, scheduler=scheduler)
    assert draws() == expected
