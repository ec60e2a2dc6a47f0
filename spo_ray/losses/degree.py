"""Self-supervised preference degree (Li et al., "Self-supervised Preference Optimization: Enhance Your
Language Model with Preference Degree Awareness", EMNLP Findings 2024, arXiv 2409.17791): pure functions.

The paper's objective is `L = L_align + λ·L_ssl`, where `L_align` is any pairwise preference loss (DPO, SPO,
...) and `L_ssl` is the cross-entropy of a classifier that tells, from the model's own representation of a
response, how much of its key content was removed. The responses of each degree are built from the data
without labels: the paper extracts key content from the text with RAKE (Rapid Automatic Keyword
Extraction) and deletes increasing amounts of it.

What is implemented here, and where it departs from the paper (its code repository holds no code):

- **Operates on token ids**, not text: the trainer has neither the text nor a stop-word list, so RAKE cannot
  run. A token's importance is RAKE's frequency term applied within the response: a token that occurs fewer
  times in the response ranks as more key (RAKE scores a word degree/frequency; a repeated token carries
  less distinct content). Ties, which are most tokens of a short response, are broken by a permutation
  drawn from `(seed, key)` (the row's example id), so a row's degraded versions are the same on every rank,
  epoch and resume.
- **Only the chosen response is degraded**, into `K = levels` versions (the issue's reading); degree `k`
  removes `m_k = ceil(k·R/K)` of the `R` removable tokens, the most key ones first, i.e. the fraction ≈ k/K
  (level 0 is the intact response). The last token of the response (its end-of-turn token in chat data) is
  never removed, so R = T − 1 and no degraded response is empty. Levels are distinct when R ≥ K; a shorter
  response gets repeated counts at its top levels (its labels still follow k).
- `degree_loss` is the mean cross-entropy over the K·B degraded responses (the paper's L_ssl) and the
  classifier's accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def removal_counts(removable: int, levels: int) -> list[int]:
    """`m_k = ceil(k·R/K)` tokens removed at degree k = 0..K−1, of `removable` (R) tokens."""
    if levels < 2:
        raise ValueError(f"degree levels must be >= 2, got {levels}")
    return [min(removable, math.ceil(k * removable / levels)) for k in range(levels)]


def key_order(tokens: Sequence[int], seed: int, key: int) -> list[int]:
    """Positions of the removable tokens (all but the last), most key first: fewest occurrences in the
    response first, ties in a permutation drawn from (seed, key)."""
    removable = list(tokens[:-1])
    counts: dict[int, int] = {}
    for token in removable:
        counts[token] = counts.get(token, 0) + 1
    tie = np.random.default_rng([seed & 0xFFFFFFFF, key & 0xFFFFFFFF]).permutation(len(removable))
    return sorted(range(len(removable)), key=lambda i: (counts[removable[i]], tie[i]))


def degrade(tokens: Sequence[int], level: int, levels: int, seed: int, key: int) -> list[int]:
    """The response `tokens` with its `removal_counts(...)[level]` most key tokens removed (order kept)."""
    if not 0 <= level < levels:
        raise ValueError(f"degree level {level} is outside 0..{levels - 1}")
    if len(tokens) == 0:
        raise ValueError("degrade: the response is empty")
    drop = set(key_order(tokens, seed, key)[: removal_counts(len(tokens) - 1, levels)[level]])
    return [token for i, token in enumerate(tokens) if i not in drop]


def degraded_versions(tokens: Sequence[int], levels: int, seed: int, key: int) -> list[list[int]]:
    """Degrees 0..K−1 of one response, level k at index k."""
    return [degrade(tokens, k, levels, seed, key) for k in range(levels)]


def degree_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response cross-entropy [M] (float32) and correctness [M] of the degree classifier's `logits` [M, K]."""
    logits = logits.float()
    return F.cross_entropy(logits, labels, reduction="none"), (logits.argmax(-1) == labels).float()
