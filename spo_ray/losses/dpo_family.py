"""Reference-based and other baseline preference losses of SPEC.md §2.4 (DPO, IPO, cDPO, rDPO, SimPO, TDPO, SPPO).

Arguments are sequence log-probabilities [B] (sums over response tokens); each function returns
unreduced per-example losses [B]. h = (lp_θ(y_w) − lp_ref(y_w)) − (lp_θ(y_l) − lp_ref(y_l)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_flip_rate(epsilon: float) -> None:
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"epsilon (label-flip rate) must be in [0, 0.5), got {epsilon}")


def preference_log_ratio(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """h = (lp_θ(y_w) − lp_ref(y_w)) − (lp_θ(y_l) − lp_ref(y_l)), [B]."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO: −log σ(β h)."""
    _check_positive("beta", beta)
    h = preference_log_ratio(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * h)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17): (h − 1/(2β))².

    With lengths, each response's log-ratio lp_θ − lp_ref is divided by its token count first (TRL's IPO,
    a reading the IPO authors confirmed): β then sets a per-token margin. Without, h uses sequence sums.
    """
    _check_positive("beta", beta)
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if chosen_lengths is not None and rejected_lengths is not None:
        chosen_ratio = chosen_ratio / chosen_lengths.to(chosen_ratio.dtype).clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_lengths.to(rejected_ratio.dtype).clamp(min=1)
    return (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2


def cdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    epsilon: float,
) -> torch.Tensor:
    """Conservative DPO (label smoothing ε): −(1−ε) log σ(βh) − ε log σ(−βh)."""
    _check_positive("beta", beta)
    _check_flip_rate(epsilon)
    h = preference_log_ratio(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1.0 - epsilon) * F.logsigmoid(beta * h) - epsilon * F.logsigmoid(-beta * h)


def rdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    epsilon: float,
) -> torch.Tensor:
    """Provably robust DPO (flip rate ε): [(1−ε)(−log σ(βh)) − ε(−log σ(−βh))] / (1 − 2ε)."""
    _check_positive("beta", beta)
    _check_flip_rate(epsilon)
    h = preference_log_ratio(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return ((1.0 - epsilon) * -F.logsigmoid(beta * h) - epsilon * -F.logsigmoid(-beta * h)) / (
        1.0 - 2.0 * epsilon
    )


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """SimPO (no reference): −log σ(β·lp_θ(y_w)/|y_w| − β·lp_θ(y_l)/|y_l| − γ); lengths in response tokens."""
    _check_positive("beta", beta)
    chosen_reward = beta * policy_chosen / chosen_lengths.to(policy_chosen.dtype).clamp(min=1)
    rejected_reward = beta * policy_rejected / rejected_lengths.to(policy_rejected.dtype).clamp(min=1)
    return -F.logsigmoid(chosen_reward - rejected_reward - gamma)


def tdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_seq_kl: torch.Tensor,
    rejected_seq_kl: torch.Tensor,
    beta: float,
    alpha: float = 0.5,
    stop_grad_chosen: bool = True,
) -> torch.Tensor:
    """Token-level DPO (Zeng et al. 2024), as in the official code's `tdpo_loss`.

    TDPO2 (default): −log σ(β·(h − α·(SeqKL(y_l) − sg(SeqKL(y_w))))), α = 0.5 by default.
    TDPO1 (`stop_grad_chosen=False`, `alpha=1`): −log σ(β·(h − (SeqKL(y_l) − SeqKL(y_w)))).
    SeqKL(y) = Σ_t KL(π_ref(·|x,y_<t) ‖ π_θ(·|x,y_<t)), from `sequence_kl_ref_to_policy`.
    """
    _check_positive("beta", beta)
    _check_positive("alpha", alpha)
    h = preference_log_ratio(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_kl = chosen_seq_kl.detach() if stop_grad_chosen else chosen_seq_kl
    return -F.logsigmoid(beta * (h - alpha * (rejected_seq_kl - chosen_kl)))


def sppo_loss(
    policy_logps: torch.Tensor, prev_logps: torch.Tensor, win_prob: torch.Tensor, eta: float
) -> torch.Tensor:
    """Self-play (SPPO): (lp_θ(y) − lp_t(y) − η·(P̂(y ≻ π_t | x) − 1/2))², per response."""
    _check_positive("eta", eta)
    return (policy_logps - prev_logps - eta * (win_prob - 0.5)) ** 2


def seqpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    base_chosen: torch.Tensor,
    base_rejected: torch.Tensor,
    beta: float,
    lam: float,
) -> torch.Tensor:
    """Sequential Preference Optimization (Lou et al., AAAI 2025, arXiv 2405.12739), stage k's loss.

    Stage k aligns dimension k starting from, and regularized toward, the previous stage's model π_{k−1}
    (here the reference), while keeping the earlier dimensions' alignment. As the paper derives it: stage k
    solves max_π E[R_k] − β·KL(π ‖ π_{k−1}) subject to the earlier dimensions' rewards being kept
    (E[R_i] ≥ c_i, i < k); with a multiplier λ on that constraint the optimum is

        π_k(y|x) ∝ π_{k−1}(y|x) · exp( (R_k(x,y) + λ·R_<k(x,y)) / β ),

    so R_k = β·log π_k/π_{k−1} − λ·R_<k + const, and Bradley–Terry on dimension k's pairs gives

        L = −log σ( β·h − λ·(R_<k(y_w) − R_<k(y_l)) ),   h = (lp_θ − lp_{k−1})(y_w) − (lp_θ − lp_{k−1})(y_l),

    with the earlier stages' reward R_<k read implicitly from the models: R_<k(y) = β·(lp_{k−1}(y) − lp_0(y)),
    lp_0 the first stage's starting model (`base_*`) and lp_{k−1} the stage's reference (`ref_*`).

    This is exact for two stages (R_<2 = β·log π_1/π_0 = R_1 + const, the paper's Eq. for two dimensions:
    π_2 ∝ π_1·exp((R_2 + λR_1)/β) = π_0·exp(((1+λ)·R_1 + R_2)/β) when stage 1 is DPO from π_0). For k > 2 it
    is a documented reading, not recovered from the paper's text (neither its n-dimension equation nor the
    official code could be retrieved): R_<k is the telescoped sum Σ_{i<k} β·log π_i/π_{i−1} of the earlier
    stages' implicit rewards, which needs only π_0 and π_{k−1}. β is the same in every stage. At stage 1,
    π_0 = π_{k−1} so the term vanishes and the loss is DPO; λ = 0 is plain sequential DPO.
    """
    _check_positive("beta", beta)
    if not lam >= 0:
        raise ValueError(f"lam (seqpo_lambda) must be >= 0, got {lam}")
    h = preference_log_ratio(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    prior = beta * preference_log_ratio(ref_chosen, ref_rejected, base_chosen, base_rejected)
    return -F.logsigmoid(beta * h - lam * prior)
