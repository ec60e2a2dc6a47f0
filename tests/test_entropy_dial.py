"""`loss.target_entropy`: the dual ascent on log α (spo_ray/training/entropy_dial.py) moves α the way that
brings the entropy to the target, and the adapted α survives a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_train_step import brute_force_logp, make_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from spo_ray.config import TrainConfig
from spo_ray.data import collate_preference_batch
from spo_ray.losses import LossParams, get_loss
from spo_ray.training.checkpointing import STATE_FILE, TrainState, load_checkpoint, save_checkpoint
from spo_ray.training.context import StepContext
from spo_ray.training.entropy_dial import (
    ALPHA_MAX,
    ALPHA_MIN,
    adapt_alpha,
    dual_ascent_alpha,
    likely_entropy,
    restore_alpha,
)
from spo_ray.training.optim import build_optimizer
from spo_ray.training.samples import likely_entropy_sums
from spo_ray.training.step import compute_step


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


def test_the_measured_entropy_is_that_of_the_likely_responses_not_of_the_rare_tail():
    # three answers the policy gives (0.5, 0.3, 0.1) and a tail of 10,000 responses at 1e-5 each (0.1 in all)
    probs = torch.cat([torch.tensor([0.5, 0.3, 0.1], dtype=torch.float64), torch.full((10_000,), 1e-5)])
    answers = probs[:3] / probs[:3].sum()
    on_answers = -(answers * answers.log()).sum().item()  # 0.937 nats: what α shapes
    whole = -(probs * probs.log()).sum().item()  # 2.30 nats, 1.15 of them the tail's
    draws = torch.multinomial(probs, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    sample_logps = probs.log()[draws]
    measured = likely_entropy(likely_entropy_sums(sample_logps, 0.01), 0.01)
    assert measured == pytest.approx(on_answers, abs=0.01)
    assert whole - on_answers > 1.0
    # min_prob 0: the whole distribution's entropy, as the per-position sum logged under entropy/response
    assert likely_entropy({"entropy/response": whole}, 0.0) == whole
    # only rare samples: no evidence, and α holds
    rare = likely_entropy_sums(torch.full((8,), math.log(1e-5)), 0.01)
    assert rare["entropy/likely_fraction"] == 0 and likely_entropy(rare, 0.01) is None
    ctx, state = _context(), TrainState()
    metrics = {"entropy/response": 9.0, **rare}
    adapt_alpha(ctx, state, metrics, target=0.8, lr=0.05, min_prob=0.01)
    assert ctx.params.alpha == 1.0 and metrics["alpha"] == 1.0 and "entropy/measured" not in metrics
    # a step that measured: α moves by the likely responses' entropy, logged as entropy/measured
    metrics = {"entropy/response": 9.0, **likely_entropy_sums(sample_logps[:1000], 0.01)}
    adapt_alpha(ctx, state, metrics, target=0.8, lr=0.05, min_prob=0.01)
    assert metrics["entropy/measured"] == likely_entropy(metrics, 0.01)
    assert state.alpha == pytest.approx(dual_ascent_alpha(1.0, 0.8, metrics["entropy/measured"], 0.05))


@pytest.mark.parametrize("packing", [False, True])
def test_the_compared_measure_is_the_exact_entropy_of_each_prompts_distinct_responses_in_the_batch(
    float64_pair, tiny_model_dir, packing
):
    policy, _ = float64_pair(0.02)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # prompt "Name a drink." has three distinct answers over three rows, "Name a color." two in one row
    prompts = ["Name a drink.", "Name a drink.", "Name a color.", "Name a drink."]
    answers = [["Tea.", "Soda."], ["Soda.", "Juice."], ["Red.", "Blue."], ["Tea.", "Juice."]]
    rows = make_rows(tokenizer, prompts, answers)
    batch = collate_preference_batch(rows, tokenizer.pad_token_id, packing=packing)
    ctx = StepContext(policy, None, None, get_loss("spo"), LossParams(alpha=1.0), 0.0, "token", 0.0)
    ctx.entropy_on = "compared"
    out = compute_step(ctx, batch, None)

    def entropy_over(prompt, responses):
        prompt_ids = rows["prompt_ids"][prompts.index(prompt)]
        logps = torch.stack(
            [
                brute_force_logp(policy, prompt_ids, tokenizer(r + "<|im_end|>")["input_ids"])
                for r in responses
            ]
        ).log_softmax(0)
        return -(logps.exp() * logps).sum().item()

    drinks = entropy_over("Name a drink.", ["Tea.", "Soda.", "Juice."])
    colors = entropy_over("Name a color.", ["Red.", "Blue."])
    assert 0 < colors <= math.log(2) and 0 < drinks <= math.log(3)
    assert out.metrics["entropy/compared"] == pytest.approx((drinks + colors) / 2, rel=1e-9)
    # the dial reads it, exact, with no online samples
    state, metrics = TrainState(), dict(out.metrics)
    adapt_alpha(ctx, state, metrics, target=1.0, lr=0.1, on="compared")
    assert metrics["entropy/measured"] == out.metrics["entropy/compared"]
    assert state.alpha == pytest.approx(math.exp(0.1 * (1.0 - metrics["entropy/measured"])))
