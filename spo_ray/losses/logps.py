"""Per-token and per-sequence log-probabilities of given tokens under a causal LM's logits."""

from __future__ import annotations

from typing import NamedTuple

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ShiftedTokens(NamedTuple):
    """Logits aligned with the tokens they predict: `logits[:, t]` is the distribution of `labels[:, t]`."""

    logits: torch.Tensor  # [B, T-1, V]
    labels: torch.Tensor  # [B, T-1]
    mask: torch.Tensor  # [B, T-1], True where labels[:, t] is a response token


def shift_for_causal_lm(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> ShiftedTokens:
    """Align a causal LM's outputs with the tokens they predict (views, no copies).

    A causal LM's `logits[:, t]` predicts `input_ids[:, t + 1]`, so the result is
    `(logits[:, :-1], input_ids[:, 1:], response_mask[:, 1:])`; `response_mask` [B, T] marks the response
    tokens of `input_ids` (prompt and padding False), and stays in `input_ids` coordinates before the shift.
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != response_mask.shape:
        raise ValueError(
            f"shift_for_causal_lm: logits {tuple(logits.shape)} must be [B, T, V] with input_ids and "
            f"response_mask [B, T]; got input_ids {tuple(input_ids.shape)}, "
            f"response_mask {tuple(response_mask.shape)}"
        )
    return ShiftedTokens(logits[:, :-1], input_ids[:, 1:], response_mask[:, 1:].bool())


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(labels[:, t] | ·) = logits[label] − logsumexp(logits), [B, T, V], [B, T] → [B, T].

    Never materializes a full log-softmax. Negative labels (e.g. -100 padding) are read as token 0, so
    mask them afterwards. Half-precision logits are upcast to float32 one sequence at a time.
    """
    safe_labels = labels.clamp(min=0).unsqueeze(-1)  # [B, T, 1]
    if logits.dtype not in _LOW_PRECISION:
        picked = logits.gather(-1, safe_labels).squeeze(-1)  # [B, T]
        return picked - torch.logsumexp(logits, dim=-1)
    # bf16/fp16 logsumexp loses the precision a sum over hundreds of tokens needs; upcast row by row
    # so that only one [T, V] float32 copy exists at a time.
    rows = []
    for row_logits, row_labels in zip(logits, safe_labels):
        row_logits = row_logits.float()  # [T, V]
        picked = row_logits.gather(-1, row_labels).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """lp(y|x) = Σ_t mask_t · log π(labels_t | ·): [B, T, V] (already aligned), [B, T], [B, T] → [B]."""
    per_token = token_logps(logits, labels)  # [B, T]
    return torch.where(mask.bool(), per_token, 0.0).sum(-1)
