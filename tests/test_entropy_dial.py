"""`loss.target_entropy`: the dual ascent on log α (spo_ray/training/entropy_dial.py) moves α the way that
brings the entropy to the target, and the adapted α survives a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from spo_ray.config import TrainConfig
from spo_ray.losses import LossParams, get_loss
from spo_ray.training.checkpointing import STATE_FILE, TrainState, load_checkpoint, save_checkpoint
from spo_ray.training.context import StepContext
from spo_ray.training.entropy_dial import ALPHA_MAX, ALPHA_MIN, adapt_alpha, dual_ascent_alpha, restore_alpha
from spo_ray.training.optim import build_optimizer


def test_alpha_rises_when_the_policy_is_less_diverse_than_asked_and_falls_when_more():
    # SPO's optimum softmax(r/α) gets more entropy as α grows, so too little entropy must raise α
    assert dual_ascent_alpha(1.0, target=1.1, measured=0.6, lr=0.1) == pytest.approx(math.exp(0.05))
    assert dual_ascent_alpha(1.0, target=0.5, measured=1.3, lr=0.1) == pytest.approx(math.exp(-0.08))
    assert dual_ascent_alpha(0.7, target=0.9, measured=0.9, lr=0.1) == 0.7
    assert dual_ascent_alpha(ALPHA_MAX, target=50.0, measured=0.0, lr=1.0) == ALPHA_MAX  # unreachable target
    assert dual_ascent_alpha(ALPHA_MIN, target=0.01, measured=50.0, lr=1.0) == ALPHA_MIN


def _context() -> StepContext:
    model = torch.nn.Linear(2, 2)
    return StepContext(model, None, None, get_loss("spo"), LossParams(alpha=1.0), 0.1, "token", 0.0)


def test_each_step_logs_alpha_and_sets_the_next_steps_alpha_in_the_state():
    ctx, state = _context(), TrainState()
    alphas = []
    for _ in range(30):  # a policy stuck at 1.3 nats, target 0.8: α falls every step
        metrics = {"entropy/response": 1.3}
        adapt_alpha(ctx, state, metrics, target=0.8, lr=0.05)
        alphas.append(metrics["alpha"])
        assert metrics["entropy/target"] == 0.8
        assert state.alpha == ctx.params.alpha
    assert alphas[0] == 1.0 and all(b < a for a, b in zip(alphas, alphas[1:]))
    assert state.alpha == pytest.approx(math.exp(-0.05 * 0.5 * 30))

    untouched = _context()
    adapt_alpha(untouched, TrainState(), {"entropy/response": 1.3}, target=0.0, lr=0.05)  # off
    assert untouched.params.alpha == 1.0
    with pytest.raises(RuntimeError, match="no online samples"):
        adapt_alpha(_context(), TrainState(), {}, target=0.8, lr=0.05)


def test_the_adapted_alpha_is_checkpointed_and_restored_on_resume(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer, scheduler = build_optimizer(model, TrainConfig(max_steps=10, warmup_steps=0))
    state = TrainState(step=7, alpha=0.4321)
    save_checkpoint(tmp_path, rank=0, model=model, optimizer=optimizer, scheduler=scheduler, state=state)
    restored = load_checkpoint(tmp_path, rank=0, model=model, optimizer=optimizer, scheduler=scheduler)
    assert restored.alpha == 0.4321
    ctx = _context()
    restore_alpha(ctx, restored, target=0.8)
    assert ctx.params.alpha == 0.4321
    fresh = _context()
    restore_alpha(fresh, TrainState(), target=0.8)  # a fresh run starts from loss.alpha
    assert fresh.params.alpha == 1.0

    # a checkpoint written before the field existed resumes with loss.alpha
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    del saved["alpha"]
    assert TrainState(**saved).alpha == 0.0
