"""`loss:`: the preference loss and the global KL regularizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spo_ray.config.fields import option


@dataclass
class LossConfig:
    name: str = option(
        "spo",
        "preference loss from the registry: spo, spo_best_of_n, spo_ranked, dpo, ipo, cdpo, rdpo, simpo, tdpo, "
        "tdpo1, sppo, seqpo",
    )
    alpha: float = option(
        1.0, "SPO softmax exponent; SPO converges to softmax(r/alpha) on compared responses", gt=0
    )
    beta: float = option(
        0.1,
        "DPO-family beta, as in TRL: the temperature of dpo, ipo, cdpo, rdpo and tdpo, and SimPO's reward scale",
        gt=0,
    )
    kl_coef: float = option(
        0.1,
        "weight c_KL of the global KL regularizer on the model's own online samples (SPEC §2.2); > 0 starts a "
        "rollout pool (vLLM engines) for those samples, 0 trains offline and starts no pool",
        ge=0,
    )
    kl_estimator: Literal["token", "token_unbiased", "sequence"] = option(
        "token", "estimator of the global KL gradient"
    )
    epsilon: float = option(0.0, "label-smoothing (cdpo) or flip rate (rdpo)", ge=0, lt=0.5)
    gamma: float = option(0.5, "SimPO target margin", ge=0)
    eta: float = option(1.0, "SPPO step size", gt=0)
    tdpo_alpha: float = option(
        0.5,
        "tdpo (TDPO2): weight of the SeqKL gap, official default 0.5; loss.name=tdpo1 is TDPO1 (weight 1, "
        "gradient through both responses)",
        gt=0,
    )
    ipo_length_normalize: bool = option(
        True,
        "ipo: divide each response's log-ratio by its token count (TRL; the IPO authors' reading), so beta "
        "sets a per-token margin 1/(2 beta); false: sequence sums, beta sets a whole-response margin",
    )
    pair_weight_gamma: float = option(
        0.0,
        "spo: pair weight exponent; each pair counts mu = exp(gamma * (l - batch mean of l)), l the model's "
        "detached per-token log-likelihood of the pair (README, SPO pair weighting); 0 is plain SPO",
        ge=0,
    )
    seqpo_lambda: float = option(
        1.0,
        "seqpo (Sequential PO): weight lambda of the earlier stages' implicit reward in stage k's loss; the "
        "stage optimum is pi_{k-1} * exp((r_k + lambda * r_<k) / beta) (README, Sequential PO); 0: plain "
        "sequential DPO",
        ge=0,
    )
    seqpo_base_path: str = option(
        "",
        "seqpo: the first stage's starting model pi_0 (a model folder); the earlier stages' reward is "
        "beta * (lp_{k-1} - lp_0), lp_{k-1} the reference; empty: the reference itself (stage 1: plain DPO). "
        "`spo-ray stages` sets it",
    )
    kl_on: Literal["online", "dataset"] = option(
        "online",
        "where the KL regularizer (kl_coef, kl_estimator) is taken: online = the policy's own vLLM samples "
        "(SPO's global KL); dataset = the preference rows' own responses, chosen and rejected (no rollout pool)",
    )
    target_entropy: float = option(
        0.0,
        "SPO family: nats per response wanted of the online samples; alpha adapts by dual ascent, log alpha += "
        "alpha_lr * (target - measured), from loss.alpha; needs kl_coef > 0, kl_on=online; 0: off, alpha fixed",
        ge=0,
    )
    alpha_lr: float = option(
        0.02,
        "loss.target_entropy: step size of the dual ascent on log alpha, per optimizer step and nat of gap",
        gt=0,
    )
    entropy_on: Literal["samples", "compared"] = option(
        "samples",
        "loss.target_entropy's measure: samples = the policy's online samples of the regularization prompts "
        "(see entropy_min_prob); compared = exact, of the policy restricted to each prompt's compared "
        "responses in the batch (what SPO's alpha sets; needs no online samples)",
    )
    entropy_min_prob: float = option(
        0.01,
        "loss.entropy_on=samples: the entropy is that of the policy among its likely responses, those it "
        "gives with probability >= this (renormalized); 0: the whole output distribution, long tail included",
        ge=0,
        lt=1,
    )
    sspo_lambda: float = option(
        0.0,
        "weight lambda of the self-supervised preference degree loss (Li et al. 2024): a head on the policy's "
        "hidden states classifies how much key content was removed from each chosen response, its "
        "cross-entropy is added to any pairwise loss (README, Self-supervised preference degree); 0 is off",
        ge=0,
    )
    sspo_levels: int = option(
        3,
        "number K of degrees for loss.sspo_lambda: degree k removes ceil(k*R/K) of a chosen response's R "
        "removable tokens (about k/K), the most key first; levels are distinct when R >= K",
        ge=2,
    )
