"""Exact full-vocabulary KL divergences between two causal LMs' next-token distributions, per position."""

from __future__ import annotations

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _kl_over_last_dim(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p_v (log p_v − log q_v) with p = softmax(logits_p), q = softmax(logits_q); [..., V] → [...]."""
    probs_p = torch.softmax(logits_p, dim=-1)  # [..., V]
    # log p − log q = (z_p − z_q) − (logsumexp z_p − logsumexp z_q); one [..., V] buffer, shifted in place.
    lse_gap = torch.logsumexp(logits_p, dim=-1, keepdim=True) - torch.logsumexp(
        logits_q, dim=-1, keepdim=True
    )
    log_ratio = (logits_p - logits_q).sub_(lse_gap)  # [..., V]
    # einsum is a matmul to autocast, which would run this sum over the vocabulary in bf16: keep it exact
    with torch.autocast(probs_p.device.type, enabled=False):
        return torch.einsum("...v,...v->...", probs_p, log_ratio)


def kl_per_position(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL_t = KL(π_θ(·|·) ‖ π_ref(·|·)) at every position over the full vocabulary: [B, T, V] x2 → [B, T].

    Half-precision logits are upcast to float32 one sequence at a time.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy_logits {tuple(policy_logits.shape)} and ref_logits {tuple(ref_logits.shape)} must match"
        )
    if policy_logits.dtype in _LOW_PRECISION or ref_logits.dtype in _LOW_PRECISION:
        return torch.stack(
            [_kl_over_last_dim(p.float(), q.float()) for p, q in zip(policy_logits, ref_logits)]
        )
    return _kl_over_last_dim(policy_logits, ref_logits)


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask_t · KL(π_θ ‖ π_ref)_t, exact over the vocabulary: [B, T, V], [B, T, V], [B, T] → [B]."""
    return torch.where(mask.bool(), kl_per_position(policy_logits, ref_logits), 0.0).sum(-1)


def sequence_kl_ref_to_policy(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """TDPO's SeqKL(y) = Σ_t mask_t · KL(π_ref ‖ π_θ)_t (note the direction), [B, T, V] x2, [B, T] → [B]."""
    return token_kl(ref_logits, policy_logits, mask)
