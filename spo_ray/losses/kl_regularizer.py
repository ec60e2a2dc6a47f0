"""Surrogate losses for the global KL regularizer of SPEC.md §2.2, one per gradient estimator.

Every estimator has one signature: (policy_logits [B, T, V], ref_logits [B, T, V], sample_tokens [B, T],
mask [B, T], behavior_logps=None, is_clip=None, baseline=None) -> KLRegularizerOutput, where
`policy_logits[:, t]` is the distribution `sample_tokens[:, t]` was drawn from (see `shift_for_causal_lm`)
and `mask` marks response tokens. `loss` [B] has the value of a KL estimate and the estimator's gradient;
the trainer adds c_KL · loss.mean() (`loss.kl_coef`).

Samples come from the rollout policy π_old. With `behavior_logps` (its per-token logprobs) and
`is_clip = c`, the truncated importance weight of the tokens y_1..y_t is

    w_t = min(c, Π_{s≤t} π_θ(y_s|·) / π_old(y_s|·)),   computed as exp(min(log c, Σ_{s≤t} log ratio_s)),

detached. A position's terms are weighted by the weight of the tokens before it, ρ_<t = w_{t−1} (ρ_<1 = 1),
and the `sequence` estimator by the whole sequence's, ρ = w_T. The product is truncated as a whole, so every
weight is at most c whatever the length (capping each factor at c would allow c^T, which overflows float32
after about 128 tokens at c = 2), and the sums are taken in log space, so no weight is inf or NaN. When c is
never reached the weights are the exact importance weights (unbiased); truncation trades a bias for bounded
variance, so keep the policy lag short.

Measured on an enumerable 3-token model (tests/test_kl_estimators.py): `token_unbiased` and `sequence`
match the exact ∇KL in expectation to ~1e-15; `token` is off by 4.5% (cosine 0.9997) with the policy near
the reference, and by more as it moves away (117%, cosine 0.47, in that test's far setting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spo_ray.losses.kl import kl_per_position
from spo_ray.losses.logps import token_logps


@dataclass(frozen=True)
class KLRegularizerOutput:
    """Per-sequence [B] tensors; all but `loss` are detached, for logging."""

    loss: torch.Tensor  # surrogate: value = (importance-weighted) KL estimate, gradient = the estimator
    kl_k1: torch.Tensor  # Σ_t (lp_θ − lp_ref)(y_t): unbiased sequence-KL estimate, samples as drawn
    kl_k3: torch.Tensor  # Σ_t [exp(lp_ref − lp_θ) − 1 − (lp_ref − lp_θ)](y_t): unbiased, never negative
    kl_token: torch.Tensor  # Σ_t exact full-vocabulary KL_t along the sample
    importance_weight: torch.Tensor  # whole-sequence weight min(c, Π_t π_θ/π_old); ones when unused
    behavior_logp_gap: torch.Tensor | None  # mean_t |lp_θ − lp_old| (a correctness alarm); None without
    # behavior_logps


@dataclass(frozen=True)
class _SampleTerms:
    mask: torch.Tensor  # [B, T] bool
    policy_logps: torch.Tensor  # [B, T], with gradient, 0 off the mask
    ref_logps: torch.Tensor  # [B, T], detached, 0 off the mask
    prefix_weight: torch.Tensor  # [B, T], min(c, Π_{s<t} π_θ/π_old(y_s)), detached
    sequence_weight: torch.Tensor  # [B], min(c, Π_t π_θ/π_old(y_t)), detached
    behavior_logp_gap: torch.Tensor | None  # [B]


def _check_logits(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, sample_tokens: torch.Tensor, mask: torch.Tensor
) -> None:
    if policy_logits.shape != ref_logits.shape or policy_logits.shape[:2] != sample_tokens.shape:
        raise ValueError(
            f"KL regularizer: policy_logits {tuple(policy_logits.shape)} and ref_logits "
            f"{tuple(ref_logits.shape)} must be [B, T, V] with sample_tokens {tuple(sample_tokens.shape)} [B, T]"
        )
    if mask.shape != sample_tokens.shape:
        raise ValueError(f"KL regularizer: mask {tuple(mask.shape)} must match sample_tokens [B, T]")


def _sample_terms(
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    behavior_logps: torch.Tensor | None,
    is_clip: float | None,
) -> _SampleTerms:
    """The per-sample terms from log π_θ(y_t|·) [B, T] (with gradient) and log π_ref(y_t|·) [B, T]."""
    if is_clip is not None and behavior_logps is None:
        raise ValueError("KL regularizer: is_clip needs behavior_logps (the rollout's per-token logprobs)")
    if is_clip is not None and not is_clip > 0:
        raise ValueError(f"KL regularizer: is_clip must be > 0, got {is_clip}")
    mask = mask.bool()
    policy_logps = torch.where(mask, policy_token_logps, 0.0)
    ref_logps = torch.where(mask, ref_token_logps.detach(), 0.0)
    # Importance weights in log space: log Π_{s≤t} π_θ/π_old along the sequence, truncated at log c.
    log_ratio_sum = torch.zeros_like(policy_logps.detach())  # [B, T], inclusive prefix sums
    gap = None
    if behavior_logps is not None:
        token_gap = policy_logps.detach() - behavior_logps.to(policy_logps.dtype)
        token_gap = torch.where(mask, token_gap, 0.0)
        gap = token_gap.abs().sum(-1) / mask.sum(-1).clamp(min=1)
        if is_clip is not None:
            log_ratio_sum = token_gap.cumsum(-1)
    log_prefix = torch.cat([torch.zeros_like(log_ratio_sum[:, :1]), log_ratio_sum[:, :-1]], dim=-1)
    log_clip = math.log(is_clip) if is_clip is not None else math.inf
    return _SampleTerms(
        mask=mask,
        policy_logps=policy_logps,
        ref_logps=ref_logps,
        prefix_weight=log_prefix.clamp(max=log_clip).exp(),  # ρ_<t: the tokens before t
        sequence_weight=log_ratio_sum[:, -1].clamp(max=log_clip).exp(),
        behavior_logp_gap=gap,
    )


def _output(terms: _SampleTerms, loss: torch.Tensor, kl_t: torch.Tensor) -> KLRegularizerOutput:
    with torch.no_grad():
        log_ratio = terms.policy_logps.detach() - terms.ref_logps  # 0 off the mask
        k3 = torch.where(terms.mask, torch.expm1(-log_ratio) + log_ratio, 0.0)
    return KLRegularizerOutput(
        loss=loss,
        kl_k1=log_ratio.sum(-1),
        kl_k3=k3.sum(-1),
        kl_token=kl_t.detach().sum(-1),
        importance_weight=terms.sequence_weight,
        behavior_logp_gap=terms.behavior_logp_gap,
    )


def _masked_kl_per_position(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor):
    return torch.where(mask, kl_per_position(policy_logits, ref_logits), 0.0)  # [B, T]


def _without_value(x: torch.Tensor) -> torch.Tensor:
    """x − sg(x): zero in value, ∇x in gradient (so a surrogate can keep the value of a KL estimate)."""
    return x - x.detach()


KLEstimator = Callable[..., KLRegularizerOutput]


def _estimator(kl_gradient: bool = True) -> Callable[[Callable[..., torch.Tensor]], KLEstimator]:
    """Make an estimator from its surrogate `loss(terms, kl_t, baseline) -> [B]`: every estimator takes the same
    arguments (policy_logits, ref_logits, sample_tokens, mask, behavior_logps, is_clip, baseline) and shares
    the per-sample terms and the exact per-position KL `kl_t` [B, T] (without gradient when only logged).

    `estimator.from_positions(policy_logps, ref_logps, kl_t, mask, behavior_logps, is_clip, baseline)` is the
    same estimator on per-position values [B, T] computed elsewhere (e.g. in chunks, without [B, T, V] logits):
    log π_θ(y_t|·) and KL_t with gradient, log π_ref(y_t|·); `estimator.kl_gradient` says whether it reads
    the gradient of KL_t (else KL_t is only logged and may come without one)."""

    def make(surrogate: Callable[..., torch.Tensor]) -> KLEstimator:
        def from_positions(
            policy_logps: torch.Tensor,
            ref_logps: torch.Tensor,
            kl_t: torch.Tensor,
            mask: torch.Tensor,
            behavior_logps: torch.Tensor | None = None,
            is_clip: float | None = None,
            baseline: torch.Tensor | float | None = None,
        ) -> KLRegularizerOutput:
            shapes = {tuple(t.shape) for t in (policy_logps, ref_logps, kl_t, mask)}
            if len(shapes) != 1 or policy_logps.dim() != 2:
                raise ValueError(
                    "KL regularizer: policy_logps, ref_logps, kl_t and mask must all be [B, T]; got "
                    f"{[tuple(t.shape) for t in (policy_logps, ref_logps, kl_t, mask)]}"
                )
            terms = _sample_terms(policy_logps, ref_logps, mask, behavior_logps, is_clip)
            kl_t = torch.where(terms.mask, kl_t if kl_gradient else kl_t.detach(), 0.0)
            return _output(terms, surrogate(terms, kl_t, baseline), kl_t)

        def estimate(
            policy_logits: torch.Tensor,
            ref_logits: torch.Tensor,
            sample_tokens: torch.Tensor,
            mask: torch.Tensor,
            behavior_logps: torch.Tensor | None = None,
            is_clip: float | None = None,
            baseline: torch.Tensor | float | None = None,
        ) -> KLRegularizerOutput:
            _check_logits(policy_logits, ref_logits, sample_tokens, mask)
            policy_logps = token_logps(policy_logits, sample_tokens)
            with torch.no_grad():
                ref_logps = token_logps(ref_logits, sample_tokens)
            terms = _sample_terms(policy_logps, ref_logps, mask, behavior_logps, is_clip)
            with torch.set_grad_enabled(kl_gradient and torch.is_grad_enabled()):
                kl_t = _masked_kl_per_position(policy_logits, ref_logits, terms.mask)
            return _output(terms, surrogate(terms, kl_t, baseline), kl_t)

        for function in (estimate, from_positions):
            function.__doc__ = surrogate.__doc__
        estimate.__name__ = estimate.__qualname__ = surrogate.__name__
        estimate.from_positions = from_positions
        estimate.kl_gradient = kl_gradient
        return estimate

    return make


@_estimator()
def token_kl_estimator(terms: _SampleTerms, kl_t: torch.Tensor, baseline=None) -> torch.Tensor:
    """`token` (biased, low variance): Σ_t ρ_<t · KL_t, exact per-position KL, prefixes held fixed."""
    return (terms.prefix_weight * kl_t).sum(-1)


@_estimator()
def token_unbiased_kl_estimator(terms: _SampleTerms, kl_t: torch.Tensor, baseline=None) -> torch.Tensor:
    """`token_unbiased`: Σ_t ρ_<t KL_t + Σ_t ∇log π_θ(y_t|·) · sg(Σ_{s>t} ρ_<s KL_s); unbiased for ∇KL."""
    weighted_kl = terms.prefix_weight * kl_t  # [B, T]
    future_kl = weighted_kl.detach().flip(-1).cumsum(-1).flip(-1) - weighted_kl.detach()  # Σ_{s>t}, [B, T]
    return weighted_kl.sum(-1) + (_without_value(terms.policy_logps) * future_kl).sum(-1)


@_estimator(kl_gradient=False)  # the per-position KL is only logged here
def sequence_kl_estimator(terms: _SampleTerms, kl_t: torch.Tensor, baseline=None) -> torch.Tensor:
    """`sequence` (unbiased, high variance): ρ · sg(d(y) − b) · ∇lp_θ(y), d = lp_θ − lp_ref; value ρ · d.

    `baseline` b: None = leave-one-out batch mean of d (the mean of the other rows, 0 when B = 1), which
    keeps the estimator unbiased (a mean including the row itself would shrink it by (B−1)/B); or a
    constant (float or [B] tensor) that does not depend on the row's own sample.
    """
    log_ratio = (terms.policy_logps - terms.ref_logps).sum(-1).detach()  # d(y), [B]
    if baseline is None:
        batch = log_ratio.shape[0]
        b = (log_ratio.sum() - log_ratio) / (batch - 1) if batch > 1 else torch.zeros_like(log_ratio)
    else:
        b = torch.as_tensor(baseline, dtype=log_ratio.dtype, device=log_ratio.device).detach()
    weight = terms.sequence_weight
    return weight * log_ratio + weight * (log_ratio - b) * _without_value(terms.policy_logps.sum(-1))


KL_ESTIMATORS: dict[str, KLEstimator] = {
    "token": token_kl_estimator,
    "token_unbiased": token_unbiased_kl_estimator,
    "sequence": sequence_kl_estimator,
}


def get_kl_estimator(name: str) -> KLEstimator:
    """The KL-regularizer estimator registered under `name` ("token", "token_unbiased", "sequence")."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {name!r}; known: {', '.join(sorted(KL_ESTIMATORS))}"
        ) from None


def kl_regularizer(estimator: str, *args: Any, **kwargs: Any) -> KLRegularizerOutput:
    """Surrogate loss [B] of the global KL regularizer under the named estimator (see the module docstring);
    the other arguments are every estimator's: policy_logits, ref_logits, sample_tokens, mask,
    behavior_logps=None, is_clip=None, baseline=None."""
    return get_kl_estimator(estimator)(*args, **kwargs)
