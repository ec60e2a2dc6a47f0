"""The global-KL regularizer's part of a step (SPEC.md §2.2): online samples as tensors, and the KL surrogate,
log-probs and entropy of the policy on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spo_ray.losses import get_kl_estimator, sequence_logps, shift_for_causal_lm
from spo_ray.training.context import StepContext, token_entropy


@dataclass
class SampleBatch:
    """Online samples as tensors: prompt + sampled tokens, right-padded."""

    input_ids: torch.Tensor  # [S, T]
    attention_mask: torch.Tensor  # [S, T]
    response_mask: torch.Tensor  # [S, T], 1 on sampled tokens
    behavior_logps: torch.Tensor  # [S, T], rollout log-probs at the sampled tokens, 0 elsewhere

    @classmethod
    def from_samples(cls, samples: Sequence, pad_token_id: int, device: torch.device) -> SampleBatch:
        """Build from rollout `Sample`s (prompt_token_ids, token_ids, logprobs)."""
        rows = [list(s.prompt_token_ids) + list(s.token_ids) for s in samples]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        response = torch.zeros((len(rows), width), dtype=torch.long)
        behavior = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (row, sample) in enumerate(zip(rows, samples)):
            start = len(sample.prompt_token_ids)
            ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            response[i, start : len(row)] = 1
            behavior[i, start : len(row)] = torch.tensor(list(sample.logprobs), dtype=torch.float32)
        return cls(ids.to(device), attention.to(device), response.to(device), behavior.to(device))


def kl_regularizer_output(ctx: StepContext, samples: SampleBatch):
    """Global-KL surrogate on online samples (SPEC.md §2.2): policy and reference forwards over them."""
    inputs = {"input_ids": samples.input_ids, "attention_mask": samples.attention_mask, "use_cache": False}
    with ctx.autocast():
        policy_logits = ctx.policy(**inputs).logits  # [S, T, V]
    ref_logits = ctx.reference_logits(**inputs)
    shifted = shift_for_causal_lm(policy_logits, samples.input_ids, samples.response_mask)
    estimator = get_kl_estimator(ctx.kl_estimator)
    kl = estimator(
        shifted.logits,
        ref_logits[:, :-1],
        shifted.labels,
        shifted.mask,
        behavior_logps=samples.behavior_logps[:, 1:],
        is_clip=ctx.importance_clip or None,
    )
    with torch.no_grad():
        sample_logps = sequence_logps(shifted.logits.detach(), shifted.labels, shifted.mask)
        logits = shifted.logits.detach()  # one sequence's sampled positions copied at a time: [t_i, V]
        entropy = torch.cat([token_entropy(row[mask]) for row, mask in zip(logits, shifted.mask)])
    return kl, sample_logps, entropy


def kl_metrics(
    kl, sample_logps: torch.Tensor, entropy: torch.Tensor, samples: SampleBatch
) -> dict[str, float]:
    """The step's logged values of the regularizer: KL estimates, importance weights, sample entropy."""
    gap = kl.behavior_logp_gap
    metrics = {
        "kl_k1": kl.kl_k1.mean().item(),
        "kl_k3": kl.kl_k3.mean().item(),
        "kl_token": kl.kl_token.mean().item(),
        "kl_surrogate": kl.loss.mean().item(),
        "rollout_logp_gap": gap.mean().item() if gap is not None else 0.0,
        "importance_weight": kl.importance_weight.mean().item(),
        "sample_entropy": (-sample_logps).mean().item(),  # Monte-Carlo entropy per sample, nats
        "sample_tokens": float(samples.response_mask.sum().item()),
    }
    metrics["kl/samples"] = metrics["kl_token"]  # Σ_t exact KL(π_θ ‖ π_ref)_t along a sample, nats
    metrics["entropy/samples"] = entropy.mean().item() if entropy.numel() else 0.0  # nats per token
    return metrics
