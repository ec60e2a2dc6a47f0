"""SPO preference losses of SPEC.md §2.1: pairwise, best-of-n and ranked (Plackett–Luce); no reference model.

The model's preference probability is P_θ(y1 ≻ y2) = π_θ(y1)^α / (π_θ(y1)^α + π_θ(y2)^α); each loss is the
negative log-likelihood of the observed preferences under it, scaled by 1/α so that gradients keep a
comparable size across α. All return unreduced per-example losses [B]. `spo_weighted_pairwise_loss` adds the
optional pair weight μ (off at γ = 0).
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


def spo_pair_weights(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """μ = exp(γ · (ℓ − mean_batch ℓ)), ℓ = sg((lp_θ(y_w) + lp_θ(y_l)) / (|y_w| + |y_l|)): detached [B].

    ℓ is the model's own per-token log-likelihood of the pair, so pairs of responses the model finds unlikely
    count less. Centring on the batch mean (in training, each worker's step batch) makes the weights'
    geometric mean 1, so equally likely pairs all weigh 1. This equation is the documented reading of the SPO
    paper's weighted preference loss (Sharifnassab et al., arXiv 2405.00747; README, "SPO pair weighting"):
    the paper's exact form could not be recovered from the sources available when it was written.
    """
    if not gamma >= 0:
        raise ValueError(f"SPO pair-weight exponent gamma must be >= 0, got {gamma}")
    with torch.no_grad():
        tokens = (chosen_lengths + rejected_lengths).to(chosen_logps.dtype).clamp(min=1)
        pair_loglik = (chosen_logps + rejected_logps) / tokens  # [B] per-token lp of the pair
        return torch.exp(gamma * (pair_loglik - pair_loglik.mean()))


def spo_weighted_pairwise_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """μ · (−(1/α) · log σ(α · (lp_θ(y_w) − lp_θ(y_l)))), μ of `spo_pair_weights` (no gradient), per pair [B].

    γ = 0 returns `spo_pairwise_loss` itself. On Bradley–Terry-consistent pairs the optimum stays softmax(r/α):
    every pair's own expected loss is minimized there, so any positive weighting of the pairs keeps it.
    """
    loss = spo_pairwise_loss(chosen_logps, rejected_logps, alpha)
    if gamma == 0:
        return loss
    return spo_pair_weights(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, gamma) * loss


def spo_best_of_n_loss(logps: torch.Tensor, best_index: torch.Tensor, alpha: float) -> torch.Tensor:
    """−(1/α) · log softmax_j(α · lp_θ(y_j))[best]; logps [B, n], best_index [B] long → [B]."""
    _check_alpha(alpha)
    return F.cross_entropy(alpha * logps, best_index.long(), reduction="none") / alpha


def complete_ranking(ranking: torch.Tensor) -> torch.Tensor:
    """Ranked columns first (best first), then the unranked ones in column order: [B, n] long permutation.

    `ranking[b]` lists the top-k columns best first and pads the tail with −1 (k = n or n − 1: a full
    ranking; k = 1: best-of-n). The result is a permutation of range(n) that starts with those k columns.
    """
    ranked = ranking.long()
    batch, n = ranked.shape
    valid = ranked >= 0  # [B, n]
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("ranking: -1 padding must come after every ranked column ([2, 0, -1, -1])")
    columns = torch.arange(n, device=ranked.device)
    # Sort key per column: its slot if ranked, else n + column. Unranked slots write to a dropped column n.
    key = (n + torch.arange(n + 1, device=ranked.device)).expand(batch, n + 1).clone()
    key.scatter_(1, torch.where(valid, ranked, n), columns.expand(batch, n).clone())
    return key[:, :n].argsort(dim=1)


def spo_ranked_loss(logps: torch.Tensor, ranking: torch.Tensor, alpha: float) -> torch.Tensor:
    """Top-k Plackett–Luce: −(1/α) · Σ_{k ranked} log[exp(α lp_τk) / Σ_{j not yet chosen} exp(α lp_j)] → [B].

    `ranking[b]` lists column indices of `logps[b]` best first; a partial ranking pads its tail with −1
    ([2, 0, -1, -1]: column 2 is the best of all n, then column 0 the best of the rest). The ranked columns
    are chosen in order among all n responses, so the unranked ones stay in every denominator; [best, -1, ...]
    is the best-of-n loss, and a full ranking is the classic Plackett–Luce likelihood.
    """
    _check_alpha(alpha)
    order = complete_ranking(ranking)  # [B, n], ranked columns first
    scores = alpha * logps.gather(-1, order)  # [B, n], α·lp in choice order
    # log Σ_{j≥k} exp(score_j): a reversed cumulative logsumexp over the columns not chosen before slot k.
    tail_logsumexp = scores.flip(-1).logcumsumexp(-1).flip(-1)  # [B, n]
    # Slots past the ranked prefix choose nothing; a full ranking's last slot contributes log(1) = 0.
    chosen = ranking.long() >= 0
    log_choice = torch.where(chosen, scores - tail_logsumexp, 0.0)
    return -log_choice.sum(-1) / alpha
