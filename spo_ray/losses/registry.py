"""The loss registry: a name maps to a `LossSpec` whose `compute(terms, params)` has one signature for all.

A loss names the `PreferenceTerms` fields it reads (`required_terms`); the trainer builds exactly those, one
builder per field (`spo_ray/training/terms.py`), and calls `spec.compute(terms, params)`; it never branches on
the loss name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch

from spo_ray.losses.dpo_family import (
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    rdpo_loss,
    seqpo_loss,
    simpo_loss,
    sppo_loss,
    tdpo_loss,
)
from spo_ray.losses.spo import spo_best_of_n_loss, spo_ranked_loss, spo_weighted_pairwise_loss

LossKind = Literal["pairwise", "best_of_n", "ranked", "sppo"]


@dataclass(frozen=True)
class PreferenceTerms:
    """Per-prompt inputs of every preference loss; a loss reads only the fields in its `required_terms`."""

    policy_logps: torch.Tensor  # [B, n] lp_θ of each response; pairwise: column 0 chosen, column 1 rejected
    ref_logps: torch.Tensor | None = None  # [B, n] lp_ref of the same responses
    lengths: torch.Tensor | None = None  # [B, n] response lengths in tokens (SimPO, IPO, SPO's pair weight)
    best_index: torch.Tensor | None = None  # [B] long, column of the preferred response (best-of-n)
    ranking: torch.Tensor | None = None  # [B, n] long, columns best first, -1 padding at the tail (ranked)
    win_prob: torch.Tensor | None = None  # [B, n] judge's P̂(y ≻ π_t | x) per response (SPPO)
    prev_logps: torch.Tensor | None = None  # [B, n] lp_t under the previous round's policy (SPPO)
    seq_kl: torch.Tensor | None = None  # [B, n] SeqKL = Σ_t KL(π_ref ‖ π_θ) per response (TDPO)
    base_logps: torch.Tensor | None = None  # [B, n] lp_0 under the first stage's starting model (seqpo)


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the registry's losses; each loss reads the ones it needs."""

    alpha: float = 1.0  # SPO softness: larger gives a flatter optimum softmax(r/α)
    beta: float = 0.1  # DPO-family temperature (SimPO uses ~2.0)
    epsilon: float = 0.0  # cDPO label smoothing / rDPO flip rate, in [0, 0.5)
    gamma: float = 0.5  # SimPO target reward margin
    eta: float = 1.0  # SPPO step size
    tdpo_alpha: float = 0.5  # TDPO2's weight of the SeqKL gap (the official default)
    ipo_length_normalize: bool = True  # IPO log-ratios per token (TRL) instead of per sequence
    pair_weight_gamma: float = 0.0  # SPO pair weight exponent γ (0: plain SPO); not SimPO's `gamma`
    seqpo_lambda: float = 1.0  # seqpo: weight λ of the earlier stages' implicit reward

    @classmethod
    def from_config(cls, loss_cfg: object) -> LossParams:
        """The fields of a config section with the same names (`cfg.loss`)."""
        return cls(**{f.name: getattr(loss_cfg, f.name) for f in fields(cls)})

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "eta", "tdpo_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LossParams.{name} must be > 0, got {getattr(self, name)}")
        if not self.seqpo_lambda >= 0:
            raise ValueError(f"LossParams.seqpo_lambda must be >= 0, got {self.seqpo_lambda}")
        if not self.pair_weight_gamma >= 0:
            raise ValueError(f"LossParams.pair_weight_gamma must be >= 0, got {self.pair_weight_gamma}")
        if not 0.0 <= self.epsilon < 0.5:
            raise ValueError(f"LossParams.epsilon must be in [0, 0.5), got {self.epsilon}")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the pure function, what it needs, and a uniform adapter to call it."""

    name: str
    fn: Callable[..., torch.Tensor]  # the pure loss function of spo.py / dpo_family.py
    kind: LossKind
    required_terms: tuple[str, ...]  # PreferenceTerms fields besides policy_logps
    adapter: Callable[[PreferenceTerms, LossParams], torch.Tensor]

    def compute(self, terms: PreferenceTerms, params: LossParams) -> torch.Tensor:
        """Unreduced per-prompt loss [B]; checks that the required terms are present and shaped [B, n]."""
        batch, n = _check_logps(self, terms.policy_logps)
        for name in self.required_terms:
            value = getattr(terms, name)
            if value is None:
                raise ValueError(f"loss {self.name!r} needs PreferenceTerms.{name}, which is None")
            expected = (batch,) if name == "best_index" else (batch, n)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"loss {self.name!r}: PreferenceTerms.{name} has shape {tuple(value.shape)}, "
                    f"expected {expected} to match policy_logps"
                )
        return self.adapter(terms, params)


def _check_logps(spec: LossSpec, policy_logps: torch.Tensor) -> tuple[int, int]:
    if policy_logps.dim() != 2:
        raise ValueError(f"loss {spec.name!r}: policy_logps must be [B, n], got {tuple(policy_logps.shape)}")
    batch, n = policy_logps.shape
    if spec.kind == "pairwise" and n != 2:
        raise ValueError(f"loss {spec.name!r} is pairwise: policy_logps must be [B, 2], got [{batch}, {n}]")
    return batch, n


def _pairwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t[:, 0], t[:, 1]


def _reference_pairwise(fn: Callable[..., torch.Tensor], *param_names: str):
    def adapter(terms: PreferenceTerms, params: LossParams) -> torch.Tensor:
        extra = [getattr(params, name) for name in param_names]
        return fn(*_pairwise(terms.policy_logps), *_pairwise(terms.ref_logps), *extra)

    return adapter


_SPECS = (
    # lengths always: exact counts from the batch (no forward), read only when pair_weight_gamma > 0
    LossSpec(
        "spo",
        spo_weighted_pairwise_loss,
        "pairwise",
        ("lengths",),
        lambda t, p: spo_weighted_pairwise_loss(
            *_pairwise(t.policy_logps), *_pairwise(t.lengths), p.alpha, p.pair_weight_gamma
        ),
    ),
    LossSpec(
        "spo_best_of_n",
        spo_best_of_n_loss,
        "best_of_n",
        ("best_index",),
        lambda t, p: spo_best_of_n_loss(t.policy_logps, t.best_index, p.alpha),
    ),
    LossSpec(
        "spo_ranked",
        spo_ranked_loss,
        "ranked",
        ("ranking",),
        lambda t, p: spo_ranked_loss(t.policy_logps, t.ranking, p.alpha),
    ),
    LossSpec("dpo", dpo_loss, "pairwise", ("ref_logps",), _reference_pairwise(dpo_loss, "beta")),
    LossSpec(
        "ipo",
        ipo_loss,
        "pairwise",
        ("ref_logps", "lengths"),
        lambda t, p: ipo_loss(
            *_pairwise(t.policy_logps),
            *_pairwise(t.ref_logps),
            p.beta,
            *(_pairwise(t.lengths) if p.ipo_length_normalize else ()),
        ),
    ),
    LossSpec(
        "cdpo", cdpo_loss, "pairwise", ("ref_logps",), _reference_pairwise(cdpo_loss, "beta", "epsilon")
    ),
    LossSpec(
        "rdpo", rdpo_loss, "pairwise", ("ref_logps",), _reference_pairwise(rdpo_loss, "beta", "epsilon")
    ),
    LossSpec(
        "simpo",
        simpo_loss,
        "pairwise",
        ("lengths",),
        lambda t, p: simpo_loss(*_pairwise(t.policy_logps), *_pairwise(t.lengths), p.beta, p.gamma),
    ),
    LossSpec(
        "tdpo",
        tdpo_loss,
        "pairwise",
        ("ref_logps", "seq_kl"),
        lambda t, p: tdpo_loss(
            *_pairwise(t.policy_logps), *_pairwise(t.ref_logps), *_pairwise(t.seq_kl), p.beta, p.tdpo_alpha
        ),
    ),
    LossSpec(  # TDPO1: the SeqKL gap at full weight, with gradient through both responses
        "tdpo1",
        tdpo_loss,
        "pairwise",
        ("ref_logps", "seq_kl"),
        lambda t, p: tdpo_loss(
            *_pairwise(t.policy_logps),
            *_pairwise(t.ref_logps),
            *_pairwise(t.seq_kl),
            p.beta,
            alpha=1.0,
            stop_grad_chosen=False,
        ),
    ),
    # Sequential PO: stage k's reference is π_{k−1}; base_logps (π_0) carries the earlier stages' reward
    LossSpec(
        "seqpo",
        seqpo_loss,
        "pairwise",
        ("ref_logps", "base_logps"),
        lambda t, p: seqpo_loss(
            *_pairwise(t.policy_logps),
            *_pairwise(t.ref_logps),
            *_pairwise(t.base_logps),
            p.beta,
            p.seqpo_lambda,
        ),
    ),
    # SPPO scores each response on its own; a prompt's loss is the mean over its n responses.
    LossSpec(
        "sppo",
        sppo_loss,
        "sppo",
        ("prev_logps", "win_prob"),
        lambda t, p: sppo_loss(t.policy_logps, t.prev_logps, t.win_prob, p.eta).mean(-1),
    ),
)

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _SPECS}


def get_loss(name: str) -> LossSpec:
    """The `LossSpec` registered under `name`; unknown names raise ValueError listing the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}") from None


def preference_metrics(terms: PreferenceTerms) -> dict[str, torch.Tensor]:
    """Detached batch means: accuracy (the preferred response has the highest implicit reward) and margin.

    Implicit reward: lp_θ − lp_ref when `ref_logps` is set, else lp_θ. The preferred column is
    `best_index`, else `ranking[:, 0]`, else 0 (pairwise chosen). Margin: preferred reward − best other
    (unranked responses included: a partial ranking puts them below every ranked one).
    """
    with torch.no_grad():
        rewards = terms.policy_logps if terms.ref_logps is None else terms.policy_logps - terms.ref_logps
        if rewards.dim() != 2 or rewards.shape[1] < 2:
            return {}
        preferred = preferred_column(terms)
        preferred_reward = rewards.gather(1, preferred[:, None]).squeeze(1)  # [B]
        others = rewards.scatter(1, preferred[:, None], -torch.inf)
        margin = preferred_reward - others.max(1).values
        return {
            "accuracy": (margin > 0).to(rewards.dtype).mean(),
            "margin": margin.mean(),
            "preferred_reward": preferred_reward.mean(),
        }


def preferred_column(terms: PreferenceTerms) -> torch.Tensor:
    """[B] long: the preferred response's column (`best_index`, else `ranking[:, 0]`, else 0 = pairwise chosen)."""
    if terms.best_index is not None:
        return terms.best_index.long()
    if terms.ranking is not None:
        return terms.ranking[:, 0].long()
    return torch.zeros(terms.policy_logps.shape[0], dtype=torch.long, device=terms.policy_logps.device)


def trl_metrics(terms: PreferenceTerms, beta: float) -> dict[str, torch.Tensor]:
    """Per-row [B] values of TRL DPOTrainer's metrics (take the mean over rows to log them).

    `logps/chosen`, `logps/rejected`: lp_θ of the preferred response and of the others; with `ref_logps`
    also `rewards/chosen` = β·(lp_θ − lp_ref) of the preferred response, `rewards/rejected` (the others'),
    `rewards/margins` = chosen − rejected and `rewards/accuracies` = 1 where the chosen reward is above every
    other response's. Pairwise rows (n = 2) give TRL's values exactly; with n > 2 "rejected" is the mean over
    the n − 1 other responses (unranked ones included). β is `loss.beta`, DPO's β as in TRL.
    """
    with torch.no_grad():
        logps = terms.policy_logps  # [B, n]
        if logps.dim() != 2 or logps.shape[1] < 2:
            return {}
        preferred = preferred_column(terms)[:, None]  # [B, 1]
        others = torch.ones_like(logps, dtype=torch.bool).scatter(1, preferred, False)  # [B, n]

        def chosen_and_rest(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rest = torch.where(others, values, 0.0).sum(1) / others.sum(1)
            return values.gather(1, preferred).squeeze(1), rest

        out = dict(zip(("logps/chosen", "logps/rejected"), chosen_and_rest(logps)))
        if terms.ref_logps is not None:
            rewards = beta * (logps - terms.ref_logps)  # [B, n]
            chosen, rejected = chosen_and_rest(rewards)
            best_other = torch.where(others, rewards, -torch.inf).max(1).values
            out.update(
                {
                    "rewards/chosen": chosen,
                    "rewards/rejected": rejected,
                    "rewards/margins": chosen - rejected,
                    "rewards/accuracies": (chosen > best_other).to(rewards.dtype),
                }
            )
        return out
