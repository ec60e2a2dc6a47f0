"""One training step's math on tensors: forwards, preference terms, KL regularizer, loss and metrics.

No Ray here: the loop in `loop.py` hands in a collated preference batch and (optionally) online samples,
and gets back the loss to backpropagate plus detached metrics. All responses of the preference batch go
through the policy in one forward (padded or packed); the online samples in a second one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from spo_ray.data.collate import PreferenceBatch, response_logps
from spo_ray.losses import (
    LossParams,
    LossSpec,
    PreferenceTerms,
    get_kl_estimator,
    preference_metrics,
    sequence_kl_ref_to_policy,
    sequence_logps,
    shift_for_causal_lm,
)


@dataclass
class SampleBatch:
    """Online samples as tensors: prompt + sampled tokens, right-padded."""

    input_ids: torch.Tensor  # [S, T]
    attention_mask: torch.Tensor  # [S, T]
    response_mask: torch.Tensor  # [S, T], 1 on sampled tokens
    behavior_logps: torch.Tensor  # [S, T], rollout log-probs at the sampled tokens, 0 elsewhere
    policy_versions: torch.Tensor  # [S] long

    @classmethod
    def from_samples(cls, samples: Sequence, pad_token_id: int, device: torch.device) -> SampleBatch:
        """Build from rollout `Sample`s (prompt_token_ids, token_ids, logprobs, policy_version)."""
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
        versions = torch.tensor([s.policy_version for s in samples], dtype=torch.long)
        return cls(ids.to(device), attention.to(device), response.to(device), behavior.to(device), versions)


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, with gradient
    metrics: dict[str, float]
    num_tokens: int


@dataclass
class StepContext:
    """What a step needs besides tensors: models, loss, and hyper-parameters."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None: the reference is `policy` with `reference_mode()` active
    reference_mode: Callable[[], AbstractContextManager] | None
    spec: LossSpec
    params: LossParams
    kl_beta: float
    kl_estimator: str
    importance_clip: float
    autocast: AbstractContextManager | None = None

    def reference_logits(self, **inputs) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(**inputs).logits
            with self.reference_mode():
                return self.policy(**inputs).logits


def preference_terms(ctx: StepContext, batch: PreferenceBatch) -> PreferenceTerms:
    """One policy forward over every response of the batch (chosen and rejected together), plus the
    reference forward when the loss needs it; fills exactly the terms the registry entry asks for."""
    n = batch.num_responses
    inputs = batch.model_inputs()
    policy_logits = ctx.policy(**inputs).logits  # [B*n, T, V] (packed: [1, total, V])
    terms: dict = {"policy_logps": response_logps(policy_logits, batch).view(-1, n)}
    required = ctx.spec.required_terms
    if "ranking" in required:
        terms["ranking"] = batch.ranking
    if "best_index" in required:
        terms["best_index"] = batch.ranking[:, 0]
    if "lengths" in required:
        terms["lengths"] = batch.response_lengths.view(-1, n).to(policy_logits.dtype)
    if ctx.spec.needs_reference:
        ref_logits = ctx.reference_logits(**inputs)
        terms["ref_logps"] = response_logps(ref_logits, batch).view(-1, n)
        if ctx.spec.needs_token_logits:
            if batch.packed:
                raise ValueError(f"loss {ctx.spec.name!r} needs per-token logits: set data.packing=false")
            policy_shift = shift_for_causal_lm(policy_logits, batch.input_ids, batch.response_mask)
            seq_kl = sequence_kl_ref_to_policy(policy_shift.logits, ref_logits[:, :-1], policy_shift.mask)
            terms["seq_kl"] = seq_kl.view(-1, n)
    missing = [name for name in required if name not in terms]
    if missing:
        raise ValueError(
            f"loss {ctx.spec.name!r} needs {missing}, which offline preference data does not provide"
        )
    return PreferenceTerms(**terms)


def kl_regularizer_output(ctx: StepContext, samples: SampleBatch):
    """Global-KL surrogate on online samples (SPEC.md §2.2): policy and reference forwards over them."""
    inputs = {"input_ids": samples.input_ids, "attention_mask": samples.attention_mask, "use_cache": False}
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
    return kl, sample_logps


def compute_step(ctx: StepContext, batch: PreferenceBatch, samples: SampleBatch | None) -> StepOutput:
    """Loss = mean preference loss + β · mean KL surrogate on the online samples (SPEC.md §2)."""
    with ctx.autocast or nullcontext():
        terms = preference_terms(ctx, batch)
        pref_loss = ctx.spec.compute(terms, ctx.params).mean()
        loss = pref_loss
        metrics = {"pref_loss": pref_loss.item()}
        metrics.update({k: v.item() for k, v in preference_metrics(terms).items()})
        num_tokens = int(batch.response_lengths.sum() + batch.prompt_lengths.sum())
        if samples is not None and ctx.kl_beta > 0:
            kl, sample_logps = kl_regularizer_output(ctx, samples)
            loss = loss + ctx.kl_beta * kl.loss.mean()
            gap = kl.behavior_logp_gap
            metrics.update(
                kl_k1=kl.kl_k1.mean().item(),
                kl_k3=kl.kl_k3.mean().item(),
                kl_token=kl.kl_token.mean().item(),
                kl_surrogate=kl.loss.mean().item(),
                rollout_logp_gap=gap.mean().item() if gap is not None else 0.0,
                importance_weight=kl.importance_weight.mean().item(),
                sample_entropy=(-sample_logps).mean().item(),  # Monte-Carlo entropy per sample, nats
                sample_tokens=float(samples.response_mask.sum().item()),
            )
            num_tokens += int(samples.attention_mask.sum().item())
    metrics["loss"] = loss.item()
    return StepOutput(loss=loss, metrics=metrics, num_tokens=num_tokens)
