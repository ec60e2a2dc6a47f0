"""The global-KL regularizer's part of a step (SPEC.md §2.2): online samples as tensors, and the KL surrogate,
log-probs and entropy of the policy on them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from spo_ray.losses import get_kl_estimator, kl_per_position, token_logps
from spo_ray.training.context import StepContext, token_entropy
from spo_ray.training.layouts import ResponseHead, ResponseTokens, per_sequence, response_head

# Logits entries per chunk of the KL pass: 2^24 float32 values are 64 MiB ([341, 49152] for SmolLM2's
# vocabulary, [130, 128256] for Llama 3's); a chunk holds a few such buffers at a time, forward or backward.
KL_CHUNK_ELEMENTS = 2**24
_LOW_PRECISION = (torch.float16, torch.bfloat16)


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

    def tokens(self) -> ResponseTokens:
        """The sampled tokens as `ResponseTokens` over these rows: position t predicts token t + 1."""
        rows, columns = self.response_mask[:, 1:].bool().nonzero(as_tuple=True)
        return ResponseTokens(
            model_inputs={
                "input_ids": self.input_ids,
                "attention_mask": self.attention_mask,
                "use_cache": False,
            },
            predictor_index=rows * self.input_ids.shape[1] + columns,
            labels=self.input_ids[rows, columns + 1],
            sequence_index=rows,
            num_sequences=self.input_ids.shape[0],
        )


@dataclass
class TokenValues:
    """Per sampled token [N] (in `SampleBatch.tokens()` order): what the regularizer reads of the logits."""

    policy_logps: torch.Tensor  # log π_θ(y_t|·), with gradient
    ref_logps: torch.Tensor  # log π_ref(y_t|·)
    kl: torch.Tensor  # exact KL(π_θ ‖ π_ref) over the vocabulary, with gradient when `kl_gradient`
    entropy: torch.Tensor  # exact H(π_θ(·|·)), no gradient


def _chunk_values(
    policy: ResponseHead, reference: ResponseHead, labels: torch.Tensor, rows: slice, kl_gradient: bool
) -> tuple[torch.Tensor, ...]:
    policy_logits = policy.logits(rows)  # [C, V]
    if policy_logits.dtype in _LOW_PRECISION:  # the math in float32, as for full logits
        policy_logits = policy_logits.float()
    policy_logps = token_logps(policy_logits[None], labels[None])[0]
    with torch.no_grad():  # after the log-probs: a backward that needs only them recomputes no further
        ref_logits = reference.logits(rows)
        ref_logits = ref_logits.float() if ref_logits.dtype in _LOW_PRECISION else ref_logits
        ref_logps = token_logps(ref_logits[None], labels[None])[0]
        entropy = token_entropy(policy_logits)
    with torch.set_grad_enabled(kl_gradient and torch.is_grad_enabled()):
        kl = kl_per_position(policy_logits[None], ref_logits[None])[0]
    return policy_logps, ref_logps, kl, entropy


def token_values(
    policy: ResponseHead, reference: ResponseHead, labels: torch.Tensor, kl_gradient: bool = True
) -> TokenValues:
    """Log-probs, exact KL and entropy per sampled token, `KL_CHUNK_ELEMENTS` logits at a time.

    With gradient, each chunk is checkpointed: its backward recomputes the chunk's logits instead of keeping
    them, so the memory is a few [C, V] buffers whatever the number of tokens. Value and gradient are those
    of the same math on full logits (tests/test_sample_kl.py).
    """
    step = max(1, KL_CHUNK_ELEMENTS // max(policy.vocab_size, 1))
    parts = []
    for start in range(0, max(policy.num_rows, 1), step):  # one empty chunk without tokens: a graph still
        rows = slice(start, start + step)
        arguments = (policy, reference, labels[rows], rows, kl_gradient)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_values, *arguments, use_reentrant=False))
        else:
            parts.append(_chunk_values(*arguments))
    return TokenValues(*(torch.cat(values) for values in zip(*parts)))


def kl_regularizer_output(ctx: StepContext, samples: SampleBatch):
    """Global-KL surrogate on online samples (SPEC.md §2.2): policy and reference forwards over them.

    Only the positions that predict sampled tokens reach the LM heads, a chunk at a time (`token_values`):
    no [S, T, V] logits of the policy or of the reference exist. Returns the estimator's output, the policy's
    log-prob of each sample [S] and its entropy at every sampled token [N] (no gradient in either).
    """
    tokens = samples.tokens()
    estimator = get_kl_estimator(ctx.kl_estimator)
    policy = response_head(ctx.policy, tokens, ctx.autocast)
    with torch.no_grad():
        if ctx.reference is not None:
            reference = response_head(ctx.reference, tokens, ctx.autocast)
        else:
            reference = response_head(
                ctx.policy, tokens, lambda: _entered(ctx.reference_mode(), ctx.autocast())
            )
    values = token_values(policy, reference, tokens.labels, estimator.kl_gradient)
    rows, columns = tokens.sequence_index, tokens.predictor_index % samples.input_ids.shape[1]

    def on_grid(per_token: torch.Tensor) -> torch.Tensor:  # [N] -> [S, T-1], 0 off the sampled tokens
        grid = per_token.new_zeros(samples.input_ids.shape[0], samples.input_ids.shape[1] - 1)
        return grid.index_put((rows, columns), per_token)

    kl = estimator.from_positions(
        on_grid(values.policy_logps),
        on_grid(values.ref_logps),
        on_grid(values.kl),
        samples.response_mask[:, 1:].bool(),
        behavior_logps=samples.behavior_logps[:, 1:],
        is_clip=ctx.importance_clip or None,
    )
    sample_logps = per_sequence(values.policy_logps.detach(), tokens)
    return kl, sample_logps, values.entropy


def _entered(*managers) -> ExitStack:
    stack = ExitStack()
    for manager in managers:
        stack.enter_context(manager)
    return stack


def kl_metrics(
    kl, sample_logps: torch.Tensor, entropy: torch.Tensor, samples: SampleBatch, min_prob: float = 0.0
) -> dict[str, float]:
    """The step's logged values of the regularizer: KL estimates, importance weights, sample entropy; with
    `min_prob` > 0 (loss.entropy_min_prob) also the two sums of the likely responses' entropy
    (`entropy_dial.likely_entropy`)."""
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
    # Σ_t exact H_t along each sample, mean over samples: the response entropy, nats (loss.target_entropy)
    rows = samples.response_mask[:, 1:].bool().nonzero(as_tuple=True)[0]
    per_sample = entropy.new_zeros(samples.input_ids.shape[0]).index_add(0, rows, entropy)
    metrics["entropy/response"] = per_sample.mean().item()
    if min_prob > 0:
        metrics.update(likely_entropy_sums(sample_logps, min_prob))
    return metrics


def likely_entropy_sums(sample_logps: torch.Tensor, min_prob: float) -> dict[str, float]:
    """The two sample means `entropy_dial.likely_entropy` reads: the fraction of samples at least `min_prob`
    likely, and −lp_θ(y) summed over those samples ÷ all samples. Plain means over samples, so the all-ranks
    mean of each is the pooled one."""
    likely = sample_logps >= math.log(min_prob)
    return {
        "entropy/likely_fraction": likely.float().mean().item(),
        "entropy/likely_neglogp": torch.where(likely, -sample_logps, 0.0).mean().item(),
    }
