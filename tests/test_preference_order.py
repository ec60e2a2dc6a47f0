"""Pairwise losses train the better response as chosen, whatever order a scored or ranked row lists it in."""

from __future__ import annotations

import json

import pytest
import torch

from spo_ray.config import DataConfig, ModelConfig, TrainConfig
from spo_ray.data import collate_preference_batch, prepare_preference_data
from spo_ray.losses import LossParams, get_loss
from spo_ray.models.loading import load_policy_and_reference
from spo_ray.training.context import StepContext
from spo_ray.training.optim import build_optimizer
from spo_ray.training.step import compute_step
from spo_ray.training.terms import needs_reference, preference_terms

PAIRS = [
    (f"Say something kind to friend {i}.", f"Hello friend {i}, good day!", f"Bye {i}.") for i in range(16)
]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _batches(tmp_path, name: str, rows: list[dict], model_dir: str, batch_size: int = 8) -> list:
    """The rows through the real Ray Data pipeline, in example-id order, collated as the worker does."""
    cfg = DataConfig(train_files=[_write(tmp_path / f"{name}.jsonl", rows)])
    prepared = prepare_preference_data(cfg, model_dir, str(tmp_path / name))
    table = sorted(prepared.train.take_all(), key=lambda row: row["example_id"])
    columns = {key: [row[key] for row in table] for key in table[0]}
    return [
        collate_preference_batch(
            {k: v[i : i + batch_size] for k, v in columns.items()}, prepared.pad_token_id
        )
        for i in range(0, len(table), batch_size)
    ]


def _context(policy, loss: str, reference=None) -> StepContext:
    return StepContext(policy, reference, None, get_loss(loss), LossParams(alpha=1.0), 0.0, "token", 0.0)


def _train(model_dir: str, batches: list, loss: str, steps: int = 12) -> torch.nn.Module:
    torch.manual_seed(0)
    need_reference = needs_reference(get_loss(loss))
    policy, reference, _ = load_policy_and_reference(ModelConfig(), model_dir, need_reference=need_reference)
    optimizer, scheduler = build_optimizer(policy, TrainConfig(lr=2e-3, warmup_steps=0, max_steps=steps))
    ctx = _context(policy, loss, reference)
    for step in range(steps):
        compute_step(ctx, batches[step % len(batches)], None).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return policy


def _margin(policy, explicit_batches) -> float:
    """Mean log π(better) − log π(worse), scored on the explicit rows (chosen = better by construction)."""
    with torch.no_grad():
        logps = torch.cat(
            [preference_terms(_context(policy, "spo"), b).policy_logps for b in explicit_batches]
        )
    return float((logps[:, 0] - logps[:, 1]).mean())


@pytest.mark.parametrize("loss", ["spo", "dpo"])
def test_scored_and_ranked_rows_train_the_better_response_as_explicit_pairs_do(
    tmp_path, tiny_model_dir, ray_runtime, loss
):
    model_dir = str(tiny_model_dir)
    explicit = _batches(
        tmp_path, "explicit", [{"prompt": p, "chosen": w, "rejected": lo} for p, w, lo in PAIRS], model_dir
    )
    listed_second = {  # the better response second, as UltraFeedback-style files often list them
        "scores": [{"prompt": p, "responses": [lo, w], "scores": [0.1, 0.9]} for p, w, lo in PAIRS],
        "ranking": [{"prompt": p, "responses": [lo, w], "ranking": [1, 0]} for p, w, lo in PAIRS],
        "best_of_n": [{"prompt": p, "responses": [lo, w], "ranking": [1]} for p, w, lo in PAIRS],
    }
    start, _, _ = load_policy_and_reference(ModelConfig(), model_dir, need_reference=False)
    before = _margin(start, explicit)
    trained_explicit = _train(model_dir, explicit, loss)
    assert _margin(trained_explicit, explicit) > before + 1.0
    for name, rows in listed_second.items():
        trained = _train(model_dir, _batches(tmp_path, name, rows, model_dir), loss)
        assert _margin(trained, explicit) > before + 1.0, name  # log π(better) − log π(worse) went up
        for (param_name, got), want in zip(trained.named_parameters(), trained_explicit.parameters()):
            assert torch.equal(got, want), f"{name}: {param_name} differs from training on explicit pairs"
