"""Log-prob helpers and the exact full-vocabulary KL, checked against brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from spo_ray.losses import (
    kl_per_position,
    sequence_kl_ref_to_policy,
    sequence_logps,
    shift_for_causal_lm,
    token_kl,
    token_logps,
)

B, T, V = 3, 7, 11


def _logits(seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, T, V, generator=gen, dtype=torch.float64)).to(dtype)


def _mask() -> torch.Tensor:
    # Row 0: prompt of 2 then response; row 1: response then right padding; row 2: one response token.
    return torch.tensor(
        [[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool
    )


def _brute_log_softmax(row: list[float]) -> list[float]:
    normalizer = math.log(sum(math.exp(z) for z in row))
    return [z - normalizer for z in row]


def _brute_kl(p_logits: list[float], q_logits: list[float]) -> float:
    log_p, log_q = _brute_log_softmax(p_logits), _brute_log_softmax(q_logits)
    return sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))


def test_token_logps_equal_the_log_softmax_of_the_label():
    logits = _logits(0)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    result = token_logps(logits, labels)
    for b in range(B):
        for t in range(T):
            expected = _brute_log_softmax(logits[b, t].tolist())[labels[b, t]]
            assert result[b, t].item() == pytest.approx(expected, rel=1e-12)


def test_sequence_logps_sum_only_masked_tokens_and_accept_ignore_index_labels():
    logits = _logits(0)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    mask = _mask()
    labels_with_ignore = torch.where(mask, labels, -100)
    result = sequence_logps(logits, labels_with_ignore, mask)
    per_token = token_logps(logits, labels)
    expected = [sum(per_token[b, t].item() for t in range(T) if mask[b, t]) for b in range(B)]
    assert result.tolist() == pytest.approx(expected, rel=1e-12)


def test_shift_for_causal_lm_pairs_each_logit_with_the_next_token():
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0]])  # prompt 5 6, response 7 8 9, padding
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0]])
    logits = _logits(0)[:1]
    shifted = shift_for_causal_lm(logits, input_ids, response_mask)
    assert shifted.labels.tolist() == [[6, 7, 8, 9, 0, 0]]
    assert shifted.mask.tolist() == [[False, True, True, True, False, False]]
    assert shifted.logits.data_ptr() == logits.data_ptr()  # a view, no copy
    # lp(response) = log p(7 | logits[1]) + log p(8 | logits[2]) + log p(9 | logits[3]).
    expected = sum(_brute_log_softmax(logits[0, t].tolist())[tok] for t, tok in [(1, 7), (2, 8), (3, 9)])
    assert sequence_logps(*shifted).item() == pytest.approx(expected, rel=1e-12)


def test_token_logps_of_bfloat16_logits_are_computed_in_float32():
    logits = _logits(0, scale=4.0, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    result = token_logps(logits, labels)
    assert result.dtype == torch.float32
    expected = token_logps(logits.double(), labels)
    assert torch.allclose(result.double(), expected, atol=1e-5)


def test_token_kl_equals_a_brute_force_kl_summed_over_masked_positions():
    policy, ref, mask = _logits(0), _logits(1), _mask()
    result = token_kl(policy, ref, mask)
    expected = [
        sum(_brute_kl(policy[b, t].tolist(), ref[b, t].tolist()) for t in range(T) if mask[b, t])
        for b in range(B)
    ]
    assert result.shape == (B,)
    assert result.tolist() == pytest.approx(expected, rel=1e-12)


def test_padding_positions_contribute_nothing_to_token_kl_or_its_gradient():
    policy, ref, mask = _logits(0).requires_grad_(), _logits(1), _mask()
    garbage_policy = torch.where(mask[..., None], policy, 1e3 * _logits(5))
    garbage_ref = torch.where(mask[..., None], ref, -1e3 * _logits(6))
    assert torch.equal(token_kl(garbage_policy, garbage_ref, mask), token_kl(policy, ref, mask))
    (grad,) = torch.autograd.grad(token_kl(policy, ref, mask).sum(), policy)
    assert grad[~mask].abs().max() == 0.0
    assert grad[mask].abs().min() > 0.0


def test_token_kl_gradient_matches_finite_differences():
    policy, ref, mask = _logits(0)[:, :3], _logits(1)[:, :3], _mask()[:, 2:5]
    assert torch.autograd.gradcheck(
        lambda p, q: token_kl(p, q, mask), (policy.requires_grad_(), ref.requires_grad_())
    )


def test_token_kl_is_zero_for_equal_distributions_and_stable_for_large_logits():
    logits = _logits(0, scale=300.0, dtype=torch.float32)
    assert torch.equal(token_kl(logits, logits + 17.0, _mask()), torch.zeros(B))  # shift-invariant, exactly 0
    ref = _logits(1, scale=300.0, dtype=torch.float32)
    result = token_kl(logits, ref, _mask())
    exact = token_kl(logits.double(), ref.double(), _mask())
    assert torch.isfinite(result).all()
    assert torch.allclose(result.double(), exact, rtol=1e-5)


def test_bfloat16_kl_is_computed_in_float32():
    policy, ref = _logits(0, dtype=torch.bfloat16), _logits(1, dtype=torch.bfloat16)
    result = kl_per_position(policy, ref)
    assert result.dtype == torch.float32
    assert torch.allclose(result.double(), kl_per_position(policy.double(), ref.double()), atol=1e-5)


def test_sequence_kl_ref_to_policy_is_the_reverse_direction():
    policy, ref, mask = _logits(0), _logits(1), _mask()
    result = sequence_kl_ref_to_policy(policy, ref, mask)
    expected = [
        sum(_brute_kl(ref[b, t].tolist(), policy[b, t].tolist()) for t in range(T) if mask[b, t])
        for b in range(B)
    ]
    assert result.tolist() == pytest.approx(expected, rel=1e-12)
    assert not torch.allclose(result, token_kl(policy, ref, mask))
