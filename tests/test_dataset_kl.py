"""`loss.kl_on=dataset`: the KL estimators on the preference rows' own responses (spo_ray/training/dataset_kl.py),
checked against the hand formula on a tiny batch, one response at a time without padding."""

from __future__ import annotations

import pytest
import torch
from test_train_step import make_rows
from transformers import AutoTokenizer

from spo_ray.data import collate_preference_batch
from spo_ray.losses import LossParams, get_loss
from spo_ray.training.context import StepContext
from spo_ray.training.step import compute_step

PROMPTS = ["Why does the river move?", "Tell me about fresh bread"]
RESPONSES = [["The river moves.", "No."], ["Fresh bread is a good reason to wake.", "Bread."]]


@pytest.fixture(scope="module")
def models(float64_pair, tiny_model_dir):
    return (*float64_pair(0.02), AutoTokenizer.from_pretrained(tiny_model_dir))


def _context(policy, reference, kl_coef, estimator="token", kl_on="dataset"):
    return StepContext(
        policy=policy,
        reference=reference,
        reference_mode=None,
        spec=get_loss("spo"),
        params=LossParams(alpha=0.7),
        kl_coef=kl_coef,
        kl_estimator=estimator,
        importance_clip=0.0,
        kl_on=kl_on,
    )


def _by_hand(policy, reference, rows):
    """Per response (chosen, rejected of each row): Σ_t exact KL(π_θ ‖ π_ref) at the data's prefixes, and
    lp_θ − lp_ref of the response."""
    token_kl, log_ratio = [], []
    for prompt, responses in zip(rows["prompt_ids"], rows["response_ids"]):
        for response in responses:
            ids = torch.tensor([list(prompt) + list(response)])
            p_log = torch.log_softmax(policy(ids).logits[0], -1)
            r_log = torch.log_softmax(reference(ids).logits[0], -1)
            positions = range(len(prompt) - 1, ids.shape[1] - 1)  # the logits that predict response tokens
            token_kl.append(sum((p_log[t].exp() * (p_log[t] - r_log[t])).sum() for t in positions))
            log_ratio.append(sum(p_log[t, ids[0, t + 1]] - r_log[t, ids[0, t + 1]] for t in positions))
    return torch.stack(token_kl).detach(), torch.stack(log_ratio).detach()


@pytest.mark.parametrize("packing", [False, True])
def test_in_dataset_kl_is_the_token_kl_along_every_chosen_and_rejected_response(models, packing):
    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, PROMPTS, RESPONSES)
    batch = collate_preference_batch(rows, tokenizer.pad_token_id, packing=packing)
    token_kl, log_ratio = _by_hand(policy, reference, rows)
    assert token_kl.min() > 0  # the policy differs from the reference on every response

    without = compute_step(_context(policy, reference, 0.0), batch, None)
    token = compute_step(_context(policy, reference, 0.5), batch, None)
    assert token.metrics["kl/dataset"] == pytest.approx(token_kl.mean().item(), rel=1e-9)
    assert token.metrics["kl_k1"] == pytest.approx(log_ratio.mean().item(), rel=1e-9)
    assert token.loss.item() == pytest.approx(without.loss.item() + 0.5 * token_kl.mean().item(), rel=1e-9)

    # `sequence`: value mean(lp_θ − lp_ref), gradient sg(d − b_leave-one-out) · ∇lp_θ
    sequence = compute_step(_context(policy, reference, 0.5, "sequence"), batch, None)
    assert sequence.loss.item() == pytest.approx(
        without.loss.item() + 0.5 * log_ratio.mean().item(), rel=1e-9
    )


def test_in_dataset_kl_gradient_is_the_gradient_of_the_token_kl_on_the_data(models):
    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, PROMPTS, RESPONSES)
    batch = collate_preference_batch(rows, tokenizer.pad_token_id)
    head = policy.get_output_embeddings().weight
    policy.zero_grad()
    (compute_step(_context(policy, reference, 1.0), batch, None).loss).backward()
    with_kl = head.grad.clone()
    policy.zero_grad()
    (compute_step(_context(policy, reference, 0.0), batch, None).loss).backward()
    kl_grad = with_kl - head.grad
    policy.zero_grad()
    exact = []
    for prompt, responses in zip(rows["prompt_ids"], rows["response_ids"]):
        for response in responses:
            ids = torch.tensor([list(prompt) + list(response)])
            p_log = torch.log_softmax(policy(ids).logits[0], -1)
            with torch.no_grad():
                r_log = torch.log_softmax(reference(ids).logits[0], -1)
            positions = range(len(prompt) - 1, ids.shape[1] - 1)
            exact.append(sum((p_log[t].exp() * (p_log[t] - r_log[t])).sum() for t in positions))
    torch.stack(exact).mean().backward()
    assert head.grad.abs().max() > 0
    torch.testing.assert_close(kl_grad, head.grad, rtol=1e-7, atol=1e-10)
    policy.zero_grad()


def test_online_kl_on_ignores_the_batch_responses(models):
    """kl_on=online without samples adds nothing: the dataset term is only taken when asked for."""
    policy, reference, tokenizer = models
    batch = collate_preference_batch(make_rows(tokenizer, PROMPTS, RESPONSES), tokenizer.pad_token_id)
    without = compute_step(_context(policy, reference, 0.0), batch, None)
    online = compute_step(_context(policy, reference, 0.5, kl_on="online"), batch, None)
    assert online.loss.item() == pytest.approx(without.loss.item(), rel=1e-12)
    assert "kl/dataset" not in online.metrics
