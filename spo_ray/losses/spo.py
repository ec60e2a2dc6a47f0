"""SPO preference losses of SPEC.md §2.1: pairwise, best-of-n and ranked (Plackett–Luce); no reference model.

The model's preference probability is P_θ(y1 ≻ y2) = π_θ(y1)^α / (π_θ(y1)^α + π_θ(y2)^α); each loss is the
negative log-likelihood of the observed preferences under it, scaled by 1/α so that gradients keep a
comparable size across α. All return unreduced per-example losses [B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"SPO softness alpha must be > 0, got {alpha}")


def spo_pairwise_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """−(1/α) · log σ(α · (lp_θ(y_w) − lp_θ(y_l))), per pair [B]."""
    _check_alpha(alpha)
    return -F.logsigmoid(alpha * (chosen_logps - rejected_logps)) / alpha


def spo_best_of_n_loss(logps: torch.Tensor, best_index: torch.Tensor, alpha: float) -> torch.Tensor:
    """−(1/α) · log softmax_j(α · lp_θ(y_j))[best]; logps [B, n], best_index [B] long → [B]."""
    _check_alpha(alpha)
    return F.cross_entropy(alpha * logps, best_index.long(), reduction="none") / alpha


def spo_ranked_loss(logps: torch.Tensor, ranking: torch.Tensor, alpha: float) -> torch.Tensor:
    """Plackett–Luce: −(1/α) · Σ_{k<n} log[exp(α lp_τk) / Σ_{j≥k} exp(α lp_τj)]; logps, ranking [B, n] → [B].

    `ranking[b]` lists column indices of `logps[b]`, best first. Rows with fewer than n ranked responses
    pad the tail with −1 (e.g. [2, 0, -1, -1]); padded slots and unranked columns take no part.
    """
    _check_alpha(alpha)
    ranked = ranking.long()
    valid = ranked >= 0  # [B, n]
    scores = alpha * logps.gather(-1, ranked.clamp(min=0))  # [B, n], α·lp in ranked order
    scores = torch.where(valid, scores, -torch.inf)
    # log Σ_{j≥k} exp(score_j): a reversed cumulative logsumexp.
    tail_logsumexp = scores.flip(-1).logcumsumexp(-1).flip(-1)  # [B, n]
    # The last ranked slot contributes log(1) = 0, so summing over every valid slot is the Σ_{k<n}.
    log_choice = torch.where(valid, scores - tail_logsumexp, 0.0)
    return -log_choice.sum(-1) / alpha
