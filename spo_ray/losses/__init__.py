"""Pure tensor functions of SPEC.md §2: SPO and baseline preference losses, log-probs, KL and its estimators."""

from spo_ray.losses.dpo_family import (
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    preference_log_ratio,
    rdpo_loss,
    simpo_loss,
    sppo_loss,
    tdpo_loss,
)
from spo_ray.losses.kl import kl_per_position, sequence_kl_ref_to_policy, token_kl
from spo_ray.losses.kl_regularizer import (
    KL_ESTIMATORS,
    KLRegularizerOutput,
    get_kl_estimator,
    kl_regularizer,
    sequence_kl_estimator,
    token_kl_estimator,
    token_unbiased_kl_estimator,
)
from spo_ray.losses.logps import ShiftedTokens, sequence_logps, shift_for_causal_lm, token_logps
from spo_ray.losses.registry import (
    LOSSES,
    LossKind,
    LossParams,
    LossSpec,
    PreferenceTerms,
    get_loss,
    preference_metrics,
    preferred_column,
    trl_metrics,
)
from spo_ray.losses.spo import spo_best_of_n_loss, spo_pairwise_loss, spo_ranked_loss

__all__ = [
    "KL_ESTIMATORS",
    "LOSSES",
    "KLRegularizerOutput",
    "LossKind",
    "LossParams",
    "LossSpec",
    "PreferenceTerms",
    "ShiftedTokens",
    "cdpo_loss",
    "dpo_loss",
    "get_kl_estimator",
    "get_loss",
    "ipo_loss",
    "kl_per_position",
    "kl_regularizer",
    "preference_log_ratio",
    "preference_metrics",
    "preferred_column",
    "rdpo_loss",
    "sequence_kl_estimator",
    "sequence_kl_ref_to_policy",
    "sequence_logps",
    "shift_for_causal_lm",
    "simpo_loss",
    "spo_best_of_n_loss",
    "spo_pairwise_loss",
    "spo_ranked_loss",
    "sppo_loss",
    "tdpo_loss",
    "token_kl",
    "token_kl_estimator",
    "token_logps",
    "token_unbiased_kl_estimator",
    "trl_metrics",
]
