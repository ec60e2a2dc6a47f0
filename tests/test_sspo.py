"""Self-supervised preference degree (loss.sspo_lambda, Li et al. arXiv 2409.17791), without Ray: the degradation
removes the stated fractions deterministically, the head's cross-entropy reaches the head and the policy, λ=0 is
the plain loss exactly, the head learns to tell degrees apart on held-out responses, and a checkpoint restores it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from spo_ray.config import TrainConfig
from spo_ray.data import collate_preference_batch
from spo_ray.losses import LossParams, get_loss
from spo_ray.losses.degree import degrade, degraded_versions, key_order, removal_counts
from spo_ray.training.checkpointing import (
    DEGREE_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from spo_ray.training.context import StepContext
from spo_ray.training.degree import DegreeAux, degraded_batch
from spo_ray.training.optim import build_optimizer
from spo_ray.training.step import compute_step

VOCAB = 64


def test_each_level_removes_its_fraction_of_the_most_key_tokens_and_keeps_the_last():
    tokens = [5, 9, 9, 7, 11, 13, 9, 17, 19, 2]  # R = 9 removable; 9 occurs three times: least key
    for levels in (2, 3, 4):
        versions = degraded_versions(tokens, levels, seed=0, key=7)
        for k, degraded in enumerate(versions):
            removed = len(tokens) - len(degraded)
            assert removed == math.ceil(k * 9 / levels)
            assert abs(removed / 9 - k / levels) < 1 / 9 + 1e-9  # the fraction k/K, to one token
            assert degraded[-1] == 2  # the end token stays
            it = iter(degraded[:-1])  # order kept: a subsequence of the original
            assert all(any(t == s for s in it) for t in degraded[:-1])
        # more degree, strictly less content
        assert [len(v) for v in versions] == sorted({len(v) for v in versions}, reverse=True)
    # the repeated token 9 is the last one removed: level 2 of 3 drops 6 tokens, none of them a 9
    assert degrade(tokens, 2, 3, seed=0, key=7).count(9) == 3
    order = key_order(tokens, seed=0, key=7)
    assert [tokens[i] for i in order[-3:]] == [9, 9, 9]
    assert removal_counts(4, 3) == [0, 2, 3]


def test_degradation_is_deterministic_in_seed_and_key():
    tokens = list(range(10, 30)) + [2]
    assert degraded_versions(tokens, 4, seed=3, key=11) == degraded_versions(tokens, 4, seed=3, key=11)
    assert degraded_versions(tokens, 4, seed=3, key=11) != degraded_versions(tokens, 4, seed=4, key=11)
    assert degraded_versions(tokens, 4, seed=3, key=11) != degraded_versions(tokens, 4, seed=3, key=12)
    with pytest.raises(ValueError, match="levels must be >= 2"):
        removal_counts(5, 1)


def _tiny_policy(seed=0, dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(dtype)


def _rows(rng: np.random.Generator, count: int, first_id: int = 0) -> dict:
    """Random prompts and pairs of random responses (6..10 tokens, then the end token 2)."""
    rows = {"prompt_ids": [], "response_ids": [], "ranking": [], "example_id": []}
    for i in range(count):
        rows["prompt_ids"].append(rng.integers(3, VOCAB, size=4))
        pair = [np.r_[rng.integers(3, VOCAB, size=rng.integers(6, 11)), 2] for _ in range(2)]
        rows["response_ids"].append(pair)
        rows["ranking"].append(np.arange(2))
        rows["example_id"].append(first_id + i)
    rows["response_ids"] = np.array(rows["response_ids"], dtype=object)
    return rows


def _context(policy, degree=None) -> StepContext:
    return StepContext(
        policy=policy,
        reference=None,
        reference_mode=None,
        spec=get_loss("spo"),
        params=LossParams(alpha=1.0),
        kl_coef=0.0,
        kl_estimator="token",
        importance_clip=0.0,
        degree=degree,
    )


def _aux(policy, weight, levels=3, lr=1e-3) -> DegreeAux:
    aux = DegreeAux.build(policy, weight, levels, seed=0, train_cfg=TrainConfig(lr=lr), device="cpu")
    aux.head.double()
    return aux


@pytest.mark.parametrize("packing", [False, True])
def test_degree_term_reaches_head_and_policy_and_lambda_zero_is_the_plain_loss(packing):
    batch = collate_preference_batch(_rows(np.random.default_rng(0), 4), pad_token_id=0, packing=packing)
    degraded = degraded_batch(batch, 3, seed=0)
    assert degraded.labels.tolist() == [0, 1, 2] * 4
    assert degraded.response_mask.sum(1).tolist()[:3] == [
        len(v) for v in degraded_versions(list(batch_chosen(batch, 0)), 3, 0, 0)
    ]

    policy = _tiny_policy()
    plain = compute_step(_context(policy), batch, None)
    plain.loss.backward()
    plain_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    aux = _aux(policy, weight=0.0)
    off = compute_step(_context(policy, aux), batch, None)
    off.loss.backward()
    assert off.loss.item() == plain.loss.item()  # λ = 0: the plain loss, bit for bit
    assert all(torch.equal(p.grad, g) for p, g in zip(policy.parameters(), plain_grads))
    assert off.metrics["sspo_loss"] > 0 and 0 <= off.metrics["sspo_acc"] <= 1
    policy.zero_grad()
    aux.head.zero_grad()

    aux.weight = 0.5
    on = compute_step(_context(policy, aux), batch, None)
    assert on.loss.item() == pytest.approx(plain.loss.item() + 0.5 * on.metrics["sspo_loss"], rel=1e-12)
    on.loss.backward()
    assert aux.head.weight.grad.abs().sum() > 0
    changed = [not torch.equal(p.grad, g) for p, g in zip(policy.parameters(), plain_grads)]
    assert sum(changed) >= len(changed) - 2  # every transformer weight hears the head (the LM head does not)


def batch_chosen(batch, row):
    """The chosen response's tokens of `row` in a collated batch (for the expected mask lengths)."""
    k = row * batch.num_responses + int(batch.ranking[row, 0])
    p, r = int(batch.prompt_lengths[k]), int(batch.response_lengths[k])
    if batch.packed:
        start = int(batch.cu_seqlens[k])
        return batch.input_ids[0, start + p : start + p + r].tolist()
    return batch.input_ids[k, p : p + r].tolist()


def test_the_head_learns_degrees_well_above_chance_on_held_out_rows():
    """Train policy + head on one set of random responses; score the head on rows it never saw."""
    rng = np.random.default_rng(1)
    policy = _tiny_policy(seed=1, dtype=torch.float32)
    aux = DegreeAux.build(policy, 1.0, 3, seed=0, train_cfg=TrainConfig(lr=3e-3), device="cpu")
    optimizer, _ = build_optimizer(policy, TrainConfig(lr=3e-3))
    ctx = _context(policy, aux)
    for step in range(30):
        batch = collate_preference_batch(_rows(rng, 16, first_id=step * 16), pad_token_id=0)
        out = compute_step(ctx, batch, None)
        out.loss.backward()
        aux.step(optimizer.param_groups[0]["lr"], 1.0, world=1)
        optimizer.step()
        optimizer.zero_grad()
    held_out = collate_preference_batch(_rows(np.random.default_rng(99), 64, first_id=10**6), pad_token_id=0)
    with torch.no_grad():
        accuracy = compute_step(ctx, held_out, None).metrics["sspo_acc"]
    assert accuracy > 0.6, accuracy  # chance is 1/3


def test_a_checkpoint_round_trip_restores_the_head_and_keeps_the_model_file_a_causal_lm(tmp_path):
    policy = _tiny_policy()
    aux = _aux(policy, weight=1.0)
    optimizer, scheduler = build_optimizer(policy, TrainConfig(max_steps=10, warmup_steps=0))
    batch = collate_preference_batch(_rows(np.random.default_rng(2), 4), pad_token_id=0)
    compute_step(_context(policy, aux), batch, None).loss.backward()
    aux.step(1e-3, 1.0, world=1)
    optimizer.step()
    folder = tmp_path / "checkpoint"
    save_checkpoint(
        folder,
        rank=0,
        model=policy,
        optimizer=optimizer,
        scheduler=scheduler,
        state=TrainState(step=1),
        degree=aux,
    )
    assert DEGREE_FILE in json.loads((folder / MANIFEST_FILE).read_text())["files"]
    assert set(load_file(str(folder / MODEL_FILE))) == set(policy.state_dict())  # no head tensor in it

    restored_policy = _tiny_policy(seed=5)
    restored = _aux(restored_policy, weight=1.0)
    with torch.no_grad():
        restored.head.weight.add_(1.0)
    optimizer2, scheduler2 = build_optimizer(restored_policy, TrainConfig(max_steps=10, warmup_steps=0))
    state = load_checkpoint(
        folder, rank=0, model=restored_policy, optimizer=optimizer2, scheduler=scheduler2, degree=restored
    )
    assert state.step == 1
    for name, tensor in aux.head.state_dict().items():
        assert torch.equal(restored.head.state_dict()[name], tensor), name
    saved, loaded = aux.optimizer.state_dict()["state"], restored.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) == 2
    for key in saved:
        assert torch.equal(saved[key]["exp_avg"], loaded[key]["exp_avg"])


def test_sppo_refuses_the_degree_loss_naming_the_key():
    from spo_ray.config import Config, validate
    from spo_ray.errors import ConfigError

    cfg = Config()
    cfg.loss.name, cfg.loss.sspo_lambda = "sppo", 0.5
    with pytest.raises(ConfigError, match="loss.sspo_lambda"):
        validate(cfg, check_files=False)
    cfg.loss.name = "dpo"
    validate(cfg, check_files=False)
