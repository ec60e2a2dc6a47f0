"""In-dataset KL regularization (`loss.kl_on=dataset`): the global-KL estimators of SPEC.md §2.2 taken on the
preference rows' own responses instead of on online samples (issue 17 item 2, the ablation of the SPO paper's
global-vs-in-dataset claim, Sharifnassab et al., arXiv 2405.00747).

Which responses: every response of every row, chosen and rejected alike (all n of a best-of-n or ranked row),
each counted once: R_data = c_KL · mean over the B·n responses of the estimator's per-response value.

The responses come from the data's distribution μ, not from π_θ, so no importance weight can make them an
estimate of KL(π_θ ‖ π_ref) (that would need π_θ/μ, and μ is unknown); none is applied (ρ = 1) and each
estimator becomes a different objective:

- `token`: Σ_t KL(π_θ(·|x,y_<t) ‖ π_ref(·|x,y_<t)) along the data's own prefixes, the exact full-vocabulary
  KL at each position; its gradient is exactly ∇ E_{y~μ} Σ_t KL_t (prefixes are data, so holding them fixed
  is exact, not a bias). This is the in-dataset token KL, the forward-direction twin of TDPO's SeqKL.
- `token_unbiased`: the `token` term plus Σ_t ∇log π_θ(y_t|·) · sg(Σ_{s>t} KL_s); the score-function term
  is unbiased only when y ~ π_θ, so on data it is a heuristic that lowers the likelihood of data prefixes
  followed by large KL.
- `sequence`: value E_μ[lp_θ(y) − lp_ref(y)] (a difference of cross-entropies, not a KL), gradient
  sg(d(y) − b) · ∇lp_θ(y) with the leave-one-out baseline: lowers lp_θ of data responses the policy already
  rates above the reference, raises the others'.

None of them sees responses outside the data, which is the point of the comparison: the mass the policy puts
outside the dataset's support is not regularized (bench/RESULTS.md, the in-dataset KL row).
"""

from __future__ import annotations

import torch

from spo_ray.losses import get_kl_estimator, kl_per_position
from spo_ray.losses.kl_regularizer import KLRegularizerOutput
from spo_ray.training.context import CHUNK, StepContext, response_token_logps
from spo_ray.training.terms import ResponseForwards


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def on_response_grid(
    per_token: torch.Tensor, sequence_index: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """[N] per response token (ordered by sequence, then position) -> [B·n, T_max], 0 past each response."""
    counts = torch.bincount(sequence_index, minlength=num_sequences)
    starts = counts.cumsum(0) - counts
    position = torch.arange(per_token.shape[0], device=per_token.device) - starts[sequence_index]
    width = int(counts.max().item()) if num_sequences else 0
    grid = per_token.new_zeros(num_sequences, max(width, 1))
    return grid.index_put((sequence_index, position), per_token)


def dataset_kl_output(ctx: StepContext, forwards: ResponseForwards) -> KLRegularizerOutput:
    """The `ctx.kl_estimator` estimator on every response of the batch (module docstring), from the forwards
    the preference terms already ran: the policy's logits (with gradient) and the reference's (a second
    forward over the same rows, without gradient)."""
    estimator = get_kl_estimator(ctx.kl_estimator)
    tokens = forwards.tokens
    policy_logits, ref_logits = forwards.policy_logits, forwards.reference_logits
    labels = tokens.labels
    policy_logps = response_token_logps(policy_logits, labels)
    with torch.no_grad():
        ref_logps = response_token_logps(ref_logits, labels)
    with torch.set_grad_enabled(estimator.kl_gradient and torch.is_grad_enabled()):
        kl = (
            torch.cat(
                [
                    kl_per_position(_upcast(p)[None], _upcast(r)[None])[0]
                    for p, r in zip(policy_logits.split(CHUNK), ref_logits.split(CHUNK))
                ]
            )
            if labels.numel()
            else policy_logps.new_zeros(0)
        )

    def grid(values: torch.Tensor) -> torch.Tensor:
        return on_response_grid(values, tokens.sequence_index, tokens.num_sequences)

    mask = grid(torch.ones_like(policy_logps)).bool()
    return estimator.from_positions(grid(policy_logps), grid(ref_logps), grid(kl), mask)


def dataset_kl_metrics(kl: KLRegularizerOutput) -> dict[str, float]:
    """The step's logged values of the in-dataset regularizer (per response, nats)."""
    metrics = {
        "kl_k1": kl.kl_k1.mean().item(),
        "kl_k3": kl.kl_k3.mean().item(),
        "kl_token": kl.kl_token.mean().item(),
        "kl_surrogate": kl.loss.mean().item(),
    }
    metrics["kl/dataset"] = metrics["kl_token"]  # Σ_t exact KL(π_θ ‖ π_ref)_t along a data response
    return metrics
