"""What a training step needs besides tensors (`StepContext`), and the chunked per-token helpers its terms share."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from spo_ray.losses import LossParams, LossSpec, token_logps


@dataclass
class StepContext:
    """Models, loss and hyper-parameters of a step."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None: the reference is `policy` with `reference_mode()` active
    reference_mode: Callable[[], AbstractContextManager] | None
    spec: LossSpec
    params: LossParams
    kl_coef: float
    kl_estimator: str
    importance_clip: float
    compute_dtype: torch.dtype | None = None  # autocast dtype of the forwards (bf16); None: the weights' own
    kl_on: str = "online"  # where the KL is taken: "online" samples, or the "dataset"'s own responses
    degree: Any = None  # training/degree.py `DegreeAux` when loss.sspo_lambda > 0, else None
    entropy_on: str = ""  # loss.entropy_on when loss.target_entropy is on; "": the dial is off
    entropy_min_prob: float = 0.0  # loss.entropy_min_prob: how likely a response counts in the entropy

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for model forwards only: the loss math after them runs in float32, outside it."""
        if self.compute_dtype is None:
            return nullcontext()
        device = next(self.policy.parameters()).device.type
        return torch.autocast(device, dtype=self.compute_dtype)


CHUNK = 1024  # response tokens per float32 upcast of half-precision logits


def response_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(label | ·) per response token: [N, V], [N] -> [N] (half precision upcast in chunks)."""
    return torch.cat(
        [
            token_logps(chunk[None], chunk_labels[None])[0]
            for chunk, chunk_labels in zip(logits.split(CHUNK), labels.split(CHUNK))
        ]
    )


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Exact full-vocabulary entropy H(π(·|·)) in nats per row: [N, V] -> [N] (upcast in chunks, no grad)."""
    with torch.no_grad():
        parts = []
        for chunk in logits.split(CHUNK):
            logp = (chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk).log_softmax(
                -1
            )
            parts.append(-(logp.exp() * logp).sum(-1))
        return torch.cat(parts) if parts else logits.new_zeros(0)
