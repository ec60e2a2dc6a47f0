"""`loss.target_entropy`: SPO's α as a dial of the policy's entropy (issue 17 item 5).

SPO converges to softmax(r/α) on the compared responses (SPEC.md §2.3), whose entropy rises with α. A user
names the entropy they want, H̄ nats per response, and α follows it by dual ascent, as SAC tunes its
temperature (Haarnoja et al. 2018, arXiv 1812.05905, eq. 18, J(α) = E[−α log π − α H̄]), on log α:

    log α_{k+1} = log α_k + η · (H̄ − Ĥ_k)        η = loss.alpha_lr, α_0 = loss.alpha

so α grows while the policy is less diverse than asked and shrinks while it is more. Ĥ_k is measured on
step k's online samples of the regularization prompts, as the entropy of the policy among its LIKELY
responses: A = {y : π_θ(y|x) ≥ τ}, τ = loss.entropy_min_prob, and q = π_θ restricted to A and renormalized,

    H(q) = E_{y~q}[−log π_θ(y|x)] + log π_θ(A|x)
    Ĥ    = mean over the samples in A of −lp_θ(y) + log(fraction of the samples in A)      (`likely_entropy`)

both terms pooled over the step's samples (all ranks). Why not the entropy of the whole output distribution
(τ = 0: Ĥ = mean over samples of Σ_t H(π_θ(·|x, y_<t)), the exact per-position entropy summed along each
sample): SPO's α sets the distribution among the compared responses, softmax(r/α) (SPEC.md §2.3), and
nothing about the long tail of rare responses, each far below τ, that the policy keeps outside them. That tail
carries most of the whole distribution's entropy (on the synthetic expert task, with 10–28% of the mass
outside S, the whole distribution's Ĥ stood 0.6–4.6 nats above the entropy on S), so a dial on it drove α to
its floor while the answers themselves became deterministic (bench/RESULTS.md, Entropy as a dial). τ = 0.01
keeps every response a user would see about once in a hundred draws or more, and leaves out rarer ones.

With loss.entropy_on=compared, Ĥ is instead exact and needs no samples (`compared_entropy`): the entropy of
π_θ restricted to each prompt's distinct responses in the batch, softmax of their lp_θ, averaged over prompts,
which is the distribution whose optimum softmax(r/α) α sets. Every step logs `entropy/measured` (the Ĥ the
dual ascent read) beside `entropy/response` (the whole distribution's, when there are online samples).

Every rank uses the all-ranks mean of the step's metrics, so α is the same everywhere; it is part of
`TrainState` (checkpointed, restored on resume). α stays within [ALPHA_MIN, ALPHA_MAX] so that an
unreachable target cannot drive it to 0 or infinity. A step none of whose samples is likely leaves α as it is.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from spo_ray.data.collate import PreferenceBatch
from spo_ray.training.checkpointing import TrainState
from spo_ray.training.context import StepContext

ALPHA_MIN, ALPHA_MAX = 1e-2, 1e2
WHOLE = "entropy/response"  # samples.kl_metrics: Σ_t exact H_t along each sample, mean over samples
LIKELY_FRACTION, LIKELY_NEGLOGP = "entropy/likely_fraction", "entropy/likely_neglogp"  # (samples.kl_metrics)
COMPARED = "entropy/compared"  # `compared_entropy`, step.compute_step with loss.entropy_on=compared


def dual_ascent_alpha(alpha: float, target: float, measured: float, lr: float) -> float:
    """One dual-ascent step on log α toward `target` nats (module docstring)."""
    return min(ALPHA_MAX, max(ALPHA_MIN, alpha * math.exp(lr * (target - measured))))


def compared_entropy(batch: PreferenceBatch, policy_logps: torch.Tensor) -> float:
    """loss.entropy_on=compared: the exact entropy of π_θ restricted to each prompt's compared responses,
    the distinct responses the prompt has in this batch C(x), q = softmax over C(x) of lp_θ(y|x), averaged
    over the batch's prompts (nats). SPO's optimum on C(x) is softmax(r/α) (SPEC.md §2.3), so this is the
    entropy α sets; it sees C(x) only as far as the batch holds it (every response of the prompt when the
    batch has enough of its rows; a single pair: at most log 2)."""
    logps = policy_logps.detach().reshape(-1).tolist()  # sequence k = i*n + j, as the batch's
    ids = batch.input_ids
    by_prompt: dict[tuple, dict[tuple, float]] = {}
    for k, logp in enumerate(logps):
        prompt_len, response_len = int(batch.prompt_lengths[k]), int(batch.response_lengths[k])
        if batch.packed:
            start = int(batch.cu_seqlens[k])
            tokens = ids[0, start : start + prompt_len + response_len].tolist()
        else:
            tokens = ids[k, : prompt_len + response_len].tolist()
        responses = by_prompt.setdefault(tuple(tokens[:prompt_len]), {})
        responses.setdefault(tuple(tokens[prompt_len:]), logp)  # the same response again: the same lp_θ
    entropies = []
    for responses in by_prompt.values():
        q = torch.tensor(list(responses.values()), dtype=torch.float64).log_softmax(0)
        entropies.append(float(-(q.exp() * q).sum()))
    return sum(entropies) / len(entropies)


def likely_entropy(metrics: dict, min_prob: float) -> float | None:
    """Ĥ of the step's (reduced) metrics: the likely responses' entropy (module docstring), the whole
    distribution's when `min_prob` is 0; None when no sample was likely (no evidence this step)."""
    if min_prob == 0:
        return metrics.get(WHOLE)
    fraction = metrics.get(LIKELY_FRACTION)
    if fraction is None or fraction == 0:
        return None
    return metrics[LIKELY_NEGLOGP] / fraction + math.log(fraction)


def restore_alpha(ctx: StepContext, state: TrainState, target: float) -> None:
    """Resume: the loss uses the α the checkpoint's steps had reached (0 in the state: not adapted yet)."""
    if target > 0 and state.alpha > 0:
        ctx.params = dataclasses.replace(ctx.params, alpha=state.alpha)


def adapt_alpha(
    ctx: StepContext,
    state: TrainState,
    metrics: dict,
    target: float,
    lr: float,
    min_prob: float = 0.0,
    on: str = "samples",
) -> None:
    """After a step: log the α it used and the entropy it measured (`on`: loss.entropy_on), and set α for
    the next step."""
    if target <= 0:
        return
    alpha = ctx.params.alpha
    if on != "compared" and WHOLE not in metrics:
        raise RuntimeError(
            "loss.target_entropy: this step drew no online samples to measure the entropy on "
            "(loss.kl_coef > 0 and loss.kl_on=online draw them)"
        )
    metrics.update({"alpha": alpha, "entropy/target": target})
    measured = metrics[COMPARED] if on == "compared" else likely_entropy(metrics, min_prob)
    if measured is None:  # every sample was rarer than loss.entropy_min_prob: α holds
        return
    metrics["entropy/measured"] = measured
    state.alpha = dual_ascent_alpha(alpha, target, measured, lr)
    ctx.params = dataclasses.replace(ctx.params, alpha=state.alpha)
