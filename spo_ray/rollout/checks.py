"""Correctness alarms: recompute sample log-probs with a transformers model and compare."""

from __future__ import annotations

import torch
from torch import nn

from spo_ray.rollout.types import Sample


@torch.no_grad()
def recompute_logprobs(model: nn.Module, samples: list[Sample]) -> list[torch.Tensor]:
    """Per sample, log π(token_ids[i] | prompt, token_ids[:i]) under `model` (one forward each)."""
    device = next(model.parameters()).device
    result = []
    for sample in samples:
        ids = torch.tensor([sample.prompt_token_ids + sample.token_ids], device=device)
        logits = model(input_ids=ids).logits[0].float()  # [prompt + response, vocab]
        start = len(sample.prompt_token_ids) - 1
        steps = torch.log_softmax(logits[start : start + len(sample.token_ids)], dim=-1)
        tokens = torch.tensor(sample.token_ids, device=device)[:, None]
        result.append(steps.gather(-1, tokens).squeeze(-1).cpu())
    return result


def logprob_gap(model: nn.Module, samples: list[Sample]) -> float:
    """Mean absolute difference between the samples' log-probs and `model`'s, over all tokens."""
    recomputed = recompute_logprobs(model, samples)
    gaps = [(ref - torch.tensor(s.logprobs)).abs() for ref, s in zip(recomputed, samples)]
    return float(torch.cat(gaps).mean()) if gaps else 0.0
