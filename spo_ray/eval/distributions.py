"""Distances between discrete distributions over a finite response set: rows of a [P, K] table, one per prompt."""

from __future__ import annotations

import torch


def restrict_to_support(probs: torch.Tensor) -> torch.Tensor:
    """Renormalize the rows of π(y|x) on S to sum to one: π(y|x) / Σ_{y'∈S} π(y'|x)."""
    return probs / probs.sum(-1, keepdim=True)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = ½ Σ |p − q| over the last dim."""
    return 0.5 * (p - q).abs().sum(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ p log p in nats over the last dim (0 log 0 = 0)."""
    return -torch.special.xlogy(p, p).sum(-1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p (log p − log q) in nats over the last dim."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)
