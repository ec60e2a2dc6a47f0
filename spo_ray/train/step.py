"""One training step's math on tensors: forwards, preference terms, KL regularizer, loss and metrics.

No Ray here: the loop in `loop.py` hands in a collated preference batch and (optionally) online samples,
and gets back the loss to backpropagate plus detached metrics. All responses of the preference batch go
through the policy in one forward; the online samples in a second one.

That forward is laid out to compute as little as possible (bench/RESULTS.md has the measurements):
each example's prompt appears once, followed by its n responses, with a 4-D attention mask that hides
the responses from each other (`shared_prompt_layout`; attention implementations that take custom masks),
else the batch's own padded or packed rows (`batch_layout`, e.g. FlashAttention's varlen packing); and
the LM head runs only at the positions that predict a response token, never over prompt or padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
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
    autocast: AbstractContextManager | None = None

    def reference_logits(self, **inputs) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(**inputs).logits
            with self.reference_mode():
                return self.policy(**inputs).logits


@dataclass
class ResponseTokens:
    """One forward over every response of a batch: the model inputs, and for each response token (N in all,
    ordered by sequence then position in every layout) which position's logits predict it, the token
    itself, and the sequence (of the B*n) it belongs to."""

    model_inputs: dict
    predictor_index: torch.Tensor  # [N] long, row * width + column of the predicting position
    labels: torch.Tensor  # [N] long
    sequence_index: torch.Tensor  # [N] long, in [0, B*n)
    num_sequences: int


# Attention implementations that honour a custom 4-D mask, and the mask's form for each.
_CUSTOM_MASK_ATTENTION = ("sdpa", "eager")


def shared_prompt_layout(
    batch: PreferenceBatch, attention: str = "sdpa", dtype=torch.float32
) -> ResponseTokens:
    """One row per example: prompt, response 1, ..., response n, right-padded to the longest row.

    Response j attends to the prompt and to its own earlier tokens only, with positions continuing from the
    prompt, so every response token sees exactly the context it has in its own sequence; the prompt's last
    position predicts the first token of every response. The prompt is computed once instead of n times.
    """
    n = batch.num_responses
    prompt_lengths = batch.prompt_lengths.view(-1, n)[:, 0].tolist()  # the n sequences share the prompt
    response_lengths = batch.response_lengths.view(-1, n).tolist()
    starts = _sequence_starts(batch)  # offset of each sequence in input_ids.reshape(-1)
    width = max(p + sum(r) for p, r in zip(prompt_lengths, response_lengths))
    num_rows = len(prompt_lengths)
    source = np.full((num_rows, width), -1, dtype=np.int64)  # index into input_ids.reshape(-1); -1 pads
    positions = np.zeros((num_rows, width), dtype=np.int64)
    segments = np.full((num_rows, width), -1, dtype=np.int64)  # -1 padding, 0 prompt, j + 1 response j
    predictor, label_source, sequence = [], [], []
    for row, (p, lengths) in enumerate(zip(prompt_lengths, response_lengths)):
        first = row * n
        source[row, :p] = starts[first] + np.arange(p)
        positions[row, :p] = np.arange(p)
        segments[row, :p] = 0
        offset = p
        for j, r in enumerate(lengths):
            tokens = starts[first + j] + p + np.arange(r)
            source[row, offset : offset + r] = tokens
            positions[row, offset : offset + r] = p + np.arange(r)
            segments[row, offset : offset + r] = j + 1
            predictor.append(row * width + np.r_[p - 1, np.arange(offset, offset + r - 1)])
            label_source.append(tokens)
            sequence.append(np.full(r, first + j))
            offset += r
    device = batch.input_ids.device
    flat_ids = batch.input_ids.reshape(-1)
    source_t = torch.from_numpy(source).to(device)
    input_ids = torch.where(source_t >= 0, flat_ids[source_t.clamp(min=0)], 0)  # [rows, width]
    seg = torch.from_numpy(segments).to(device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    query, key = seg[:, :, None], seg[:, None, :]
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))  # [rows, width, width]
    allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding rows see themselves: no NaN
    mask = allowed[:, None]  # [rows, 1, width, width]; sdpa reads True as "attend"
    if attention == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    return ResponseTokens(
        model_inputs={
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": torch.from_numpy(positions).to(device),
            "use_cache": False,
        },
        predictor_index=torch.from_numpy(np.concatenate(predictor)).to(device),
        labels=flat_ids[torch.from_numpy(np.concatenate(label_source)).to(device)],
        sequence_index=torch.from_numpy(np.concatenate(sequence)).to(device),
        num_sequences=batch.num_sequences,
    )


def batch_layout(batch: PreferenceBatch) -> ResponseTokens:
    """The batch's own rows (padded [B*n, T] or packed [1, total]): position t predicts response token t + 1."""
    label_mask = batch.response_mask[:, 1:].bool()  # [rows, T-1]
    rows, columns = label_mask.nonzero(as_tuple=True)
    width = batch.input_ids.shape[1]
    if batch.packed:  # the first token of a sequence is a prompt token, so no label crosses a boundary
        sequence = torch.bucketize(columns + 1, batch.cu_seqlens[1:].to(columns.device).long(), right=True)
    else:
        sequence = rows
    return ResponseTokens(
        model_inputs=batch.model_inputs(),
        predictor_index=rows * width + columns,
        labels=batch.input_ids[rows, columns + 1],
        sequence_index=sequence,
        num_sequences=batch.num_sequences,
    )


def _sequence_starts(batch: PreferenceBatch) -> list[int]:
    if batch.packed:
        return batch.cu_seqlens[:-1].tolist()
    return [k * batch.input_ids.shape[1] for k in range(batch.num_sequences)]


def response_tokens(model: torch.nn.Module, batch: PreferenceBatch) -> ResponseTokens:
    """The cheapest layout `model`'s attention supports: shared prompts, else the batch's own rows."""
    attention = _attention(model)
    if attention in _CUSTOM_MASK_ATTENTION:
        return shared_prompt_layout(batch, attention, next(model.parameters()).dtype)
    return batch_layout(batch)


def _attention(model: torch.nn.Module) -> str | None:
    return getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel / FSDP wrap the model as .module


def response_logits(model: torch.nn.Module, tokens: ResponseTokens) -> torch.Tensor:
    """Logits [N, V] at the positions that predict the response tokens, from one forward of `model`.

    A forward pre-hook on the LM head hands it only those positions' hidden states, so the [rows, width, V]
    logits over prompt and padding are never computed. The forward still goes through `model` itself
    (DDP's gradient hooks and PEFT adapters see a normal call).
    """
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        logits = model(**tokens.model_inputs).logits
        return logits.reshape(-1, logits.shape[-1])[tokens.predictor_index]

    def keep_predictors(module, args):
        hidden = args[0]  # [rows, width, H]
        return (hidden.reshape(-1, hidden.shape[-1])[tokens.predictor_index], *args[1:])

    handle = head.register_forward_pre_hook(keep_predictors)
    try:
        logits = model(**tokens.model_inputs).logits
    finally:
        handle.remove()
    if logits.dim() != 2 or logits.shape[0] != tokens.labels.shape[0]:
        raise RuntimeError(
            f"{type(_unwrap(model)).__name__}'s forward reshaped the LM head's output to {tuple(logits.shape)}; "
            f"expected [{tokens.labels.shape[0]}, vocab]"
        )
    return logits


_CHUNK = 1024  # response tokens per float32 upcast of half-precision logits


def per_sequence(values: torch.Tensor, tokens: ResponseTokens) -> torch.Tensor:
    """Sum per-token values [N] into their sequences: [B*n]."""
    out = torch.zeros(tokens.num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, tokens.sequence_index, values)


def response_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(label | ·) per response token: [N, V], [N] -> [N] (half precision upcast in chunks)."""
    return torch.cat(
        [
            token_logps(chunk[None], chunk_labels[None])[0]
            for chunk, chunk_labels in zip(logits.split(_CHUNK), labels.split(_CHUNK))
        ]
    )


def preference_terms(ctx: StepContext, batch: PreferenceBatch) -> PreferenceTerms:
    """One policy forward over every response of the batch (chosen and rejected together), plus the
    reference forward when the loss needs it; fills exactly the terms the registry entry asks for."""
    n = batch.num_responses
    tokens = response_tokens(ctx.policy, batch)
    policy_logits = response_logits(ctx.policy, tokens)  # [N, V]
    policy_logps = per_sequence(response_token_logps(policy_logits, tokens.labels), tokens)
    terms: dict = {"policy_logps": policy_logps.view(-1, n)}
    required = ctx.spec.required_terms
    if "ranking" in required:
        terms["ranking"] = batch.ranking
    if "best_index" in required:
        terms["best_index"] = batch.ranking[:, 0]
    if "lengths" in required:
        terms["lengths"] = batch.response_lengths.view(-1, n).to(policy_logits.dtype)
    for name in ("prev_logps", "win_prob"):  # SPPO: [B, n] scored with π_t and judged before the round
        value = getattr(batch, name, None)
        if name in required and value is not None:
            terms[name] = value.to(device=policy_logps.device, dtype=policy_logps.dtype)
    # [B, n] reference log-probs scored once before training (train/reference.py), when the data has them
    precomputed = getattr(batch, "ref_logps", None)
    if ctx.spec.needs_reference and precomputed is not None and not ctx.spec.needs_token_logits:
        terms["ref_logps"] = precomputed.to(device=policy_logps.device, dtype=policy_logps.dtype)
    elif ctx.spec.needs_reference:
        with torch.no_grad():
            if ctx.reference is not None:
                same_layout = _attention(ctx.reference) == _attention(ctx.policy)
                ref_tokens = tokens if same_layout else response_tokens(ctx.reference, batch)
                ref_logits = response_logits(ctx.reference, ref_tokens)
            else:
                with ctx.reference_mode():
                    ref_logits = response_logits(ctx.policy, tokens)
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
    """Loss = mean preference loss + c_KL · mean KL surrogate on the online samples (SPEC.md §2)."""
    with ctx.autocast or nullcontext():
        terms = preference_terms(ctx, batch)
        pref_loss = ctx.spec.compute(terms, ctx.params).mean()
        loss = pref_loss
        metrics = {"pref_loss": pref_loss.item()}
        metrics.update({k: v.item() for k, v in preference_metrics(terms).items()})
        num_tokens = int(batch.response_lengths.sum() + batch.prompt_lengths.sum())
        if samples is not None and ctx.kl_coef > 0:
            kl, sample_logps = kl_regularizer_output(ctx, samples)
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
            num_tokens += int(samples.attention_mask.sum().item())
    metrics["loss"] = loss.item()
    return StepOutput(loss=loss, metrics=metrics, num_tokens=num_tokens)
