"""How a preference batch goes through a model in one forward: the layout of its rows and the LM-head hook.

The forward is laid out to compute as little as possible (bench/RESULTS.md has the measurements): each
example's prompt appears once, followed by its n responses, with a 4-D attention mask that hides the
responses from each other (`shared_prompt_layout`), where that mask is exact for the model; else the batch's
own padded or packed rows (`batch_layout`, e.g. FlashAttention's varlen packing, sliding-window attention).
The LM head runs only at the positions that predict a response token, never over prompt or padding.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from spo_ray.data.collate import PreferenceBatch


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


# Model families whose attention is a plain causal mask over rotary positions taken from `position_ids`: a
# 4-D mask with continued positions reproduces it exactly. Others (ALiBi, local/global layer mixes, logit
# soft-capping, ...) keep their own masks in the padded layout.
_SHARED_PROMPT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")


def shared_prompt_attention(model: torch.nn.Module, batch: PreferenceBatch) -> str | None:
    """The attention implementation when `shared_prompt_layout` is exact for `model` on `batch`, else None.

    A custom 4-D mask replaces the model's own mask, sliding window included; the window changes nothing only
    when every sequence of the batch (prompt + response) fits inside it.
    """
    config = getattr(_unwrap(model), "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if (
        attention not in _CUSTOM_MASK_ATTENTION
        or getattr(config, "model_type", None) not in _SHARED_PROMPT_FAMILIES
    ):
        return None
    window = _sliding_window(config)
    return attention if window is None or window >= batch.max_seqlen else None


def _sliding_window(config) -> int | None:
    """The attention window some layer of the model applies, or None."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and all(kind == "full_attention" for kind in layer_types):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def response_tokens(model: torch.nn.Module, batch: PreferenceBatch) -> ResponseTokens:
    """The cheapest exact layout for `model`: shared prompts, else the batch's own rows."""
    attention = shared_prompt_attention(model, batch)
    if attention is not None:
        return shared_prompt_layout(batch, attention, next(model.parameters()).dtype)
    return batch_layout(batch)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel / FSDP wrap the model as .module


def response_logits(
    model: torch.nn.Module, tokens: ResponseTokens, autocast: AbstractContextManager | None = None
) -> torch.Tensor:
    """Logits [N, V] at the positions that predict the response tokens, from one forward of `model`.

    A forward pre-hook on the LM head hands it only those positions' hidden states, so the [rows, width, V]
    logits over prompt and padding are never computed. The forward still goes through `model` itself
    (DDP's gradient hooks and PEFT adapters see a normal call), inside `autocast` when given.
    """
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        with autocast or nullcontext():
            logits = model(**tokens.model_inputs).logits
        return logits.reshape(-1, logits.shape[-1])[tokens.predictor_index]

    def keep_predictors(module, args):
        hidden = args[0]  # [rows, width, H]
        return (hidden.reshape(-1, hidden.shape[-1])[tokens.predictor_index], *args[1:])

    handle = head.register_forward_pre_hook(keep_predictors)
    try:
        with autocast or nullcontext():
            logits = model(**tokens.model_inputs).logits
    finally:
        handle.remove()
    if logits.dim() != 2 or logits.shape[0] != tokens.labels.shape[0]:
        raise RuntimeError(
            f"{type(_unwrap(model)).__name__}'s forward reshaped the LM head's output to {tuple(logits.shape)}; "
            f"expected [{tokens.labels.shape[0]}, vocab]"
        )
    return logits


class ResponseHead:
    """The logits at the positions that predict the response tokens, a chunk of rows at a time.

    Built by `response_head` from one forward that keeps only those positions' final hidden states [N, H]:
    `logits(rows)` runs the LM head on those rows (inside `context`, e.g. autocast), so the [N, V] logits of
    all positions never exist at once, and a backward through a chunk reaches the hidden states and the head's
    weights as the model's own head call would. A model that transforms its head's output inside its forward
    (soft-capping, a logit scale) keeps the [N, V] logits of `response_logits` instead, still exact.
    """

    def __init__(
        self,
        hidden: torch.Tensor | None,
        head: torch.nn.Module | None,
        context: Callable[[], AbstractContextManager],
        vocab_size: int,
        logits: torch.Tensor | None = None,
    ):
        self.hidden, self.head, self.context, self.full_logits = hidden, head, context, logits
        self.vocab_size = vocab_size
        self.num_rows = int((logits if logits is not None else hidden).shape[0])

    def logits(self, rows: slice) -> torch.Tensor:
        """[C, V] for the response tokens `rows` (in `ResponseTokens` order)."""
        if self.full_logits is not None:
            return self.full_logits[rows]
        with self.context():
            return self.head(self.hidden[rows])


# LM heads whose model transforms their output in its forward (found by `response_head`'s probe).
_TRANSFORMED_HEADS: weakref.WeakSet = weakref.WeakSet()


def response_head(
    model: torch.nn.Module,
    tokens: ResponseTokens,
    context: Callable[[], AbstractContextManager] | None = None,
) -> ResponseHead:
    """`ResponseHead` of `model` over `tokens`, from one forward inside `context()` (autocast, a reference
    mode), which its chunks enter again.

    A forward pre-hook on the LM head keeps the hidden states of the positions that predict response tokens
    and hands the head only the first of them: a probe that the model returns the head's output unchanged
    (else the model is remembered and gets `response_logits`, a second forward this once).
    """
    context = context or nullcontext
    head = _unwrap(model).get_output_embeddings()
    if head is None or head in _TRANSFORMED_HEADS:
        with context():
            logits = response_logits(model, tokens)
        return ResponseHead(None, None, context, logits.shape[-1], logits)
    kept: dict[str, torch.Tensor] = {}

    def keep_predictors(module, args):
        hidden = args[0]  # [rows, width, H]
        kept["hidden"] = hidden.reshape(-1, hidden.shape[-1])[tokens.predictor_index]
        return (kept["hidden"][:1], *args[1:])

    def keep_probe(module, args, output):
        kept["probe"] = output

    handles = [head.register_forward_pre_hook(keep_predictors), head.register_forward_hook(keep_probe)]
    try:
        with context():
            logits = model(**tokens.model_inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    probe = kept["probe"].detach()
    if probe.numel() and not (
        logits.shape[-1] == probe.shape[-1]
        and torch.equal(logits.detach().reshape(-1, logits.shape[-1]), probe.to(logits.dtype))
    ):
        _TRANSFORMED_HEADS.add(head)
        return response_head(model, tokens, context)
    return ResponseHead(kept["hidden"], head, context, probe.shape[-1])


def per_sequence(values: torch.Tensor, tokens: ResponseTokens) -> torch.Tensor:
    """Sum per-token values [N] into their sequences: [B*n]."""
    out = torch.zeros(tokens.num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, tokens.sequence_index, values)
