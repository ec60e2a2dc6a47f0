"""Batches for the trainer: padded or packed tensors with response masks, and response log-probs."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from spo_ray.losses.logps import sequence_logps, shift_for_causal_lm, token_logps


@dataclass
class PreferenceBatch:
    """B examples with n responses; sequence k = i*n + j. Padded: [B*n, T]; packed: [1, total] with
    position_ids restarting per sequence, cu_seqlens boundaries and attention_mask None (README.md)."""

    input_ids: torch.Tensor  # [B*n, T] long (packed: [1, total])
    attention_mask: torch.Tensor | None  # [B*n, T] long; None when packed
    response_mask: torch.Tensor  # like input_ids; 1 exactly on response tokens (eos included)
    ranking: torch.Tensor  # [B, n] long, best first; -1 pads a best-of-n ranking [best, -1, ...]
    example_ids: torch.Tensor  # [B] long
    num_responses: int
    response_lengths: torch.Tensor  # [B*n] long
    prompt_lengths: torch.Tensor  # [B*n] long
    position_ids: torch.Tensor | None = None  # packed: [1, total] long, 0 at each sequence start
    cu_seqlens: torch.Tensor | None = None  # packed: [B*n + 1] int32
    max_seqlen: int = 0  # longest sequence (prompt + response) in the batch
    epoch_positions: torch.Tensor | None = None  # [B] long, for rows from `train_shards`
    ref_logps: torch.Tensor | None = None  # [B, n] precomputed reference log-probs (train/reference.py)
    prev_logps: torch.Tensor | None = None  # [B, n] SPPO: log-probs under the round's start policy π_t
    win_prob: torch.Tensor | None = None  # [B, n] SPPO: the judge's P̂(y ≻ π_t | x)
    base_logps: torch.Tensor | None = None  # [B, n] seqpo: log-probs under the first stage's start π_0
    packed: bool = False

    @property
    def num_sequences(self) -> int:
        """B * n."""
        return self.response_lengths.shape[0]

    def to(self, device: torch.device | str) -> PreferenceBatch:
        """The same batch with every tensor on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for a Hugging Face causal LM forward in this batch's layout."""
        if self.packed:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}


def _ids(value: Any) -> np.ndarray:
    return np.array(value, dtype=np.int64).reshape(-1)  # a copy: batches from Ray are read-only


def collate_preference_batch(
    rows: dict[str, np.ndarray], pad_token_id: int, packing: bool = False
) -> PreferenceBatch:
    """One numpy batch of tokenized rows (DataIterator.iter_batches) -> PreferenceBatch of torch tensors."""
    prompts = [_ids(p) for p in rows["prompt_ids"]]
    responses = [[_ids(r) for r in example] for example in rows["response_ids"]]
    n = len(responses[0])
    if any(len(example) != n for example in responses):
        raise ValueError("collate_preference_batch: every row of a batch needs the same number of responses")
    sequences = [(p, r) for p, example in zip(prompts, responses) for r in example]
    prompt_lengths = torch.tensor([len(p) for p, _ in sequences], dtype=torch.long)
    response_lengths = torch.tensor([len(r) for _, r in sequences], dtype=torch.long)
    if int(prompt_lengths.min()) < 1:
        raise ValueError("collate_preference_batch: a prompt is empty; its first response token has no logit")
    lengths = prompt_lengths + response_lengths
    ranking = torch.from_numpy(np.stack([_ids(r) for r in rows["ranking"]]))
    extra = {}
    if "epoch_position" in rows:
        extra["epoch_positions"] = torch.from_numpy(_ids(rows["epoch_position"]))
    for column in ("ref_logps", "prev_logps", "win_prob", "base_logps"):  # optional per-response floats
        if column in rows:
            values = [np.asarray(r, dtype=np.float64) for r in rows[column]]
            if any(v.shape != (n,) for v in values):
                raise ValueError(f"collate_preference_batch: every row needs {n} values of '{column}'")
            extra[column] = torch.from_numpy(np.stack(values))
    common = {
        "ranking": ranking,
        "example_ids": torch.from_numpy(_ids(rows["example_id"])),
        "num_responses": n,
        "response_lengths": response_lengths,
        "prompt_lengths": prompt_lengths,
        "max_seqlen": int(lengths.max()),
        **extra,
    }
    if packing:
        ids = np.concatenate([np.concatenate([p, r]) for p, r in sequences])
        positions = np.concatenate([np.arange(int(k)) for k in lengths])
        in_response = np.concatenate(
            [np.r_[np.zeros(len(p), np.int64), np.ones(len(r), np.int64)] for p, r in sequences]
        )
        cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        return PreferenceBatch(
            input_ids=torch.from_numpy(ids)[None],
            attention_mask=None,
            response_mask=torch.from_numpy(in_response)[None],
            position_ids=torch.from_numpy(positions)[None],
            cu_seqlens=cu,
            packed=True,
            **common,
        )
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for k, (p, r) in enumerate(sequences):
        input_ids[k, : len(p)] = torch.from_numpy(p)
        input_ids[k, len(p) : len(p) + len(r)] = torch.from_numpy(r)
        attention_mask[k, : len(p) + len(r)] = 1
        response_mask[k, len(p) : len(p) + len(r)] = 1
    return PreferenceBatch(input_ids, attention_mask, response_mask, **common)


def response_logps(logits: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """lp(y|x) summed over response tokens, per sequence: [B*n], from logits of either layout."""
    shifted = shift_for_causal_lm(logits, batch.input_ids, batch.response_mask)
    if not batch.packed:
        return sequence_logps(shifted.logits, shifted.labels, shifted.mask)
    per_token = torch.where(shifted.mask, token_logps(shifted.logits, shifted.labels), 0.0)[0]  # [total-1]
    # label t+1 belongs to the sequence whose boundary range holds t+1; the first token of a sequence is
    # a prompt token (mask 0), so logits that would cross a boundary never count.
    label_positions = torch.arange(1, batch.input_ids.shape[1], device=logits.device)
    sequence_of = torch.bucketize(label_positions, batch.cu_seqlens[1:].to(logits.device).long(), right=True)
    out = torch.zeros(batch.num_sequences, dtype=per_token.dtype, device=logits.device)
    return out.index_add(0, sequence_of, per_token)
