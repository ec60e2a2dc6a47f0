"""The global-KL term in chunks (training/samples.py) against the same math on full [S, T, V] logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from spo_ray.losses import LossParams, get_kl_estimator, get_loss, sequence_logps, shift_for_causal_lm
from spo_ray.training import samples as samples_module
from spo_ray.training.context import StepContext, token_entropy
from spo_ray.training.samples import SampleBatch, kl_regularizer_output


@pytest.fixture(scope="module")
def models(float64_pair):
    return float64_pair(0.05)


def full_logits_term(ctx: StepContext, samples: SampleBatch):
    """The term as it was: policy and reference logits over every position of every row."""
    inputs = {"input_ids": samples.input_ids, "attention_mask": samples.attention_mask}
    shifted = shift_for_causal_lm(ctx.policy(**inputs).logits, samples.input_ids, samples.response_mask)
    with torch.no_grad():
        ref_logits = ctx.reference(**inputs).logits
    kl = get_kl_estimator(ctx.kl_estimator)(
        shifted.logits,
        ref_logits[:, :-1],
        shifted.labels,
        shifted.mask,
        behavior_logps=samples.behavior_logps[:, 1:],
        is_clip=ctx.importance_clip or None,
    )
    logits = shifted.logits.detach()
    entropy = torch.cat([token_entropy(row[mask]) for row, mask in zip(logits, shifted.mask)])
    return kl, sequence_logps(logits, shifted.labels, shifted.mask), entropy


def _samples() -> SampleBatch:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for prompt, length in ((7, 9), (3, 2), (11, 5), (5, 1)):  # unequal prompts and samples: padding
        rows.append(
            SimpleNamespace(
                prompt_token_ids=torch.randint(3, 200, (prompt,), generator=gen).tolist(),
                token_ids=torch.randint(3, 200, (length,), generator=gen).tolist(),
                logprobs=(-4 * torch.rand(length, generator=gen)).tolist(),
            )
        )
    return SampleBatch.from_samples(rows, 0, torch.device("cpu"))


@pytest.mark.parametrize("importance_clip", [0.0, 2.0])
@pytest.mark.parametrize("estimator", ["token", "token_unbiased", "sequence"])
def test_chunked_kl_term_has_the_value_and_gradient_of_full_logits(
    models, monkeypatch, estimator, importance_clip
):
    policy, reference = models
    monkeypatch.setattr(samples_module, "KL_CHUNK_ELEMENTS", 5 * policy.config.vocab_size)  # 5-row chunks
    ctx = StepContext(policy, reference, None, get_loss("spo"), LossParams(), 0.5, estimator, importance_clip)
    samples = _samples()
    outputs = []
    for term in (full_logits_term, kl_regularizer_output):
        policy.zero_grad()
        kl, sample_logps, entropy = term(ctx, samples)
        kl.loss.mean().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in policy.parameters()])
        outputs.append((kl, sample_logps, entropy, grads))
    (old, old_logps, old_entropy, old_grads), (new, new_logps, new_entropy, new_grads) = outputs
    for name in ("loss", "kl_k1", "kl_k3", "kl_token", "importance_weight", "behavior_logp_gap"):
        assert (getattr(old, name).detach() - getattr(new, name).detach()).abs().max() < 1e-6, name
    assert (old_logps - new_logps).abs().max() < 1e-6
    assert old_entropy.shape == new_entropy.shape == (17,)
    assert (old_entropy - new_entropy).abs().max() < 1e-6
    assert old_grads.abs().max() > 1e-3  # the gradient reaches the weights, and equals the full one
    assert (old_grads - new_grads).abs().max() < 1e-6 * old_grads.abs().max()
