"""One training step's math on tensors: forwards, preference terms, KL regularizer, loss and metrics.

No Ray here: the loop in `loop.py` hands in a collated preference batch and (optionally) online samples,
and gets back the loss to backpropagate plus detached metrics. All responses of the preference batch go
through the policy in one forward (laid out by `layouts.py`); the online samples in a second one. Forwards
run under the context's autocast; the loss math after them runs in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from spo_ray.data.collate import PreferenceBatch
from spo_ray.losses import (
    LossParams,
    LossSpec,
    PreferenceTerms,
    get_kl_estimator,
    kl_per_position,
    preference_metrics,
    sequence_logps,
    shift_for_causal_lm,
    token_logps,
    trl_metrics,
)
from spo_ray.training.layouts import (
    per_sequence,
    response_logits,
    response_tokens,
    shared_prompt_attention,
)


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
    kl_coef: float
    kl_estimator: str
    importance_clip: float
    compute_dtype: torch.dtype | None = None  # autocast dtype of the forwards (bf16); None: the weights' own

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for model forwards only: the loss math after them runs in float32, outside it."""
        if self.compute_dtype is None:
            return nullcontext()
        device = next(self.policy.parameters()).device.type
        return torch.autocast(device, dtype=self.compute_dtype)

    def reference_logits(self, **inputs) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            if self.reference is not None:
                return self.reference(**inputs).logits
            with self.reference_mode():
                return self.policy(**inputs).logits


_CHUNK = 1024  # response tokens per float32 upcast of half-precision logits


def response_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(label | ·) per response token: [N, V], [N] -> [N] (half precision upcast in chunks)."""
    return torch.cat(
        [
            token_logps(chunk[None], chunk_labels[None])[0]
            for chunk, chunk_labels in zip(logits.split(_CHUNK), labels.split(_CHUNK))
        ]
    )


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Exact full-vocabulary entropy H(π(·|·)) in nats per row: [N, V] -> [N] (upcast in chunks, no grad)."""
    with torch.no_grad():
        parts = []
        for chunk in logits.split(_CHUNK):
            logp = (chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk).log_softmax(
                -1
            )
            parts.append(-(logp.exp() * logp).sum(-1))
        return torch.cat(parts) if parts else logits.new_zeros(0)


def _reference_response_logits(ctx: StepContext, batch: PreferenceBatch, tokens) -> torch.Tensor:
    """[N, V] reference logits at the response positions of `tokens` (the policy's layout), without grad:
    the reference copy (in its own layout when its attention differs), or the adapter-free policy."""
    with torch.no_grad():
        if ctx.reference is None:
            with ctx.reference_mode():
                return response_logits(ctx.policy, tokens, ctx.autocast())
        same_layout = shared_prompt_attention(ctx.reference, batch) == shared_prompt_attention(
            ctx.policy, batch
        )
        ref_tokens = tokens if same_layout else response_tokens(ctx.reference, batch)
        return response_logits(ctx.reference, ref_tokens, ctx.autocast())


def reference_response_logps(ctx: StepContext, batch: PreferenceBatch) -> torch.Tensor:
    """[B, n] lp_ref of every response of the batch (no grad): the reference copy, or the adapter-free policy."""
    tokens = response_tokens(ctx.policy, batch)
    logits = _reference_response_logits(ctx, batch, tokens)
    return per_sequence(response_token_logps(logits, tokens.labels), tokens).view(-1, batch.num_responses)


def policy_response_logps(ctx: StepContext, batch: PreferenceBatch) -> torch.Tensor:
    """[B, n] lp_θ of every response of the batch, in one policy forward (with grad when enabled)."""
    tokens = response_tokens(ctx.policy, batch)
    logits = response_logits(ctx.policy, tokens, ctx.autocast())
    return per_sequence(response_token_logps(logits, tokens.labels), tokens).view(-1, batch.num_responses)


def preference_terms(ctx: StepContext, batch: PreferenceBatch) -> PreferenceTerms:
    """One policy forward over every response of the batch (chosen and rejected together), plus the
    reference forward when the loss needs it; fills exactly the terms the registry entry asks for."""
    n = batch.num_responses
    if ctx.spec.kind != "sppo" and bool((batch.ranking[:, 0] < 0).any()):
        raise ValueError(
            f"loss {ctx.spec.name!r} trains on preference orders, and this batch has rows without one "
            "(SPPO self-play rows, which carry win_probs): train them with loss.name=sppo"
        )
    tokens = response_tokens(ctx.policy, batch)
    policy_logits = response_logits(ctx.policy, tokens, ctx.autocast())  # [N, V]
    policy_logps = per_sequence(response_token_logps(policy_logits, tokens.labels), tokens)  # float32
    terms: dict = {"policy_logps": policy_logps.view(-1, n)}
    required = ctx.spec.required_terms
    if "ranking" in required:
        terms["ranking"] = batch.ranking
    if "best_index" in required:
        terms["best_index"] = batch.ranking[:, 0]
    if "lengths" in required:
        terms["lengths"] = batch.response_lengths.view(-1, n).to(policy_logps.dtype)  # exact: never bf16
    for name in ("prev_logps", "win_prob"):  # SPPO: [B, n] scored with π_t and judged before the round
        value = getattr(batch, name, None)
        if name in required and value is not None:
            terms[name] = value.to(device=policy_logps.device, dtype=policy_logps.dtype)
    # [B, n] reference log-probs scored once before training (train/reference.py), when the data has them
    precomputed = getattr(batch, "ref_logps", None)
    if ctx.spec.needs_reference and precomputed is not None and not ctx.spec.needs_token_logits:
        terms["ref_logps"] = precomputed.to(device=policy_logps.device, dtype=policy_logps.dtype)
    elif ctx.spec.needs_reference:
        ref_logits = _reference_response_logits(ctx, batch, tokens)
        terms["ref_logps"] = per_sequence(response_token_logps(ref_logits, tokens.labels), tokens).view(-1, n)
        if ctx.spec.needs_token_logits:
            # SeqKL = Σ_t KL(π_ref ‖ π_θ)_t over response positions (note the direction)
            kl = torch.cat(
                [
                    kl_per_position(ref_chunk[None], policy_chunk[None])[0]
                    for ref_chunk, policy_chunk in zip(ref_logits.split(_CHUNK), policy_logits.split(_CHUNK))
                ]
            )
            terms["seq_kl"] = per_sequence(kl, tokens).view(-1, n)
    missing = [name for name in required if name not in terms]
    if missing:
        raise ValueError(
            f"loss {ctx.spec.name!r} needs {missing}, which this preference data does not provide "
            "(sppo trains on rows with win_probs, which `spo-ray iterate` builds each round)"
        )
    return PreferenceTerms(**terms)


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


def compute_step(ctx: StepContext, batch: PreferenceBatch, samples: SampleBatch | None) -> StepOutput:
    """Loss = mean preference loss + c_KL · mean KL surrogate on the online samples (SPEC.md §2)."""
    terms = preference_terms(ctx, batch)
    pref_loss = ctx.spec.compute(terms, ctx.params).mean()
    loss = pref_loss
    metrics = {"pref_loss": pref_loss.item()}
    metrics.update({k: v.item() for k, v in preference_metrics(terms).items()})
    # TRL's names; rewards/* only where this step has reference log-probs (reference-based losses)
    metrics.update({k: v.mean().item() for k, v in trl_metrics(terms, ctx.params.beta).items()})
    num_tokens = int(batch.response_lengths.sum() + batch.prompt_lengths.sum())
    if samples is not None and ctx.kl_coef > 0:
        kl, sample_logps, entropy = kl_regularizer_output(ctx, samples)
        loss = loss + ctx.kl_coef * kl.loss.mean()
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
        metrics["kl/samples"] = metrics["kl_token"]  # Σ_t exact KL(π_θ ‖ π_ref)_t along a sample, nats
        metrics["entropy/samples"] = entropy.mean().item() if entropy.numel() else 0.0  # nats per token
        num_tokens += int(samples.attention_mask.sum().item())
    metrics["loss"] = loss.item()
    return StepOutput(loss=loss, metrics=metrics, num_tokens=num_tokens)
