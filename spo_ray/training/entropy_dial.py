"""`loss.target_entropy`: SPO's α as a dial of the policy's entropy (issue 17 item 5).

SPO converges to softmax(r/α) on the compared responses (SPEC.md §2.3), whose entropy rises with α. A user
names the entropy they want, H̄ nats per response, and α follows it by dual ascent, as SAC tunes its
temperature (Haarnoja et al. 2018, arXiv 1812.05905, eq. 18, J(α) = E[−α log π − α H̄]), on log α:

    log α_{k+1} = log α_k + η · (H̄ − Ĥ_k)        η = loss.alpha_lr, α_0 = loss.alpha

so α grows while the policy is less diverse than asked and shrinks while it is more. Ĥ_k is measured on
step k's online samples of the regularization prompts, Ĥ = mean over samples of Σ_t H(π_θ(·|x, y_<t)), the
exact full-vocabulary entropy at each sampled position summed along the sample: by the chain rule an
unbiased estimate of the response entropy H(π_θ(·|x)) when y ~ π_θ, with lower variance than −lp_θ(y)
(`sample_entropy`, also logged). It is the entropy of the whole output distribution, responses outside the
compared set included. Every rank uses the all-ranks mean of Ĥ (the step's reduced metrics), so α is the same
everywhere; it is part of `TrainState` (checkpointed, restored on resume). α stays within [ALPHA_MIN,
ALPHA_MAX] so that an unreachable target cannot drive it to 0 or infinity.
"""

from __future__ import annotations

import dataclasses
import math

from spo_ray.training.checkpointing import TrainState
from spo_ray.training.context import StepContext

ALPHA_MIN, ALPHA_MAX = 1e-2, 1e2
MEASURED = "entropy/response"  # the step metric the dual ascent reads (samples.kl_metrics)


def dual_ascent_alpha(alpha: float, target: float, measured: float, lr: float) -> float:
    """One dual-ascent step on log α toward `target` nats (module docstring)."""
    return min(ALPHA_MAX, max(ALPHA_MIN, alpha * math.exp(lr * (target - measured))))


def restore_alpha(ctx: StepContext, state: TrainState, target: float) -> None:
    """Resume: the loss uses the α the checkpoint's steps had reached (0 in the state: not adapted yet)."""
    if target > 0 and state.alpha > 0:
        ctx.params = dataclasses.replace(ctx.params, alpha=state.alpha)


def adapt_alpha(ctx: StepContext, state: TrainState, metrics: dict, target: float, lr: float) -> None:
    """After a step: log the α it used and the entropy it measured, and set α for the next step."""
    if target <= 0:
        return
    alpha = ctx.params.alpha
    measured = metrics.get(MEASURED)
    if measured is None:
        raise RuntimeError(
            "loss.target_entropy: this step drew no online samples to measure the entropy on "
            "(loss.kl_coef > 0 and loss.kl_on=online draw them)"
        )
    metrics.update({"alpha": alpha, "entropy/target": target})
    state.alpha = dual_ascent_alpha(alpha, target, measured, lr)
    ctx.params = dataclasses.replace(ctx.params, alpha=state.alpha)
