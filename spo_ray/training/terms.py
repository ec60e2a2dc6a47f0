"""The preference terms of a step: each `PreferenceTerms` field has one `Term` here, and a loss lists the
fields it reads (`LossSpec.required_terms`). `preference_terms` builds exactly those, sharing the batch's
forwards; the worker and the runner read the same entries to know what to load or score before training.

A new loss that reads existing terms is one `LossSpec` in the registry. A loss that needs a new term adds the
field to `PreferenceTerms` and its `Term` here; the step, the collate and the runner stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from spo_ray.data.collate import PreferenceBatch
from spo_ray.losses import LossSpec, PreferenceTerms, kl_per_position
from spo_ray.training.context import CHUNK, StepContext, response_token_logps
from spo_ray.training.layouts import per_sequence, response_logits, response_tokens, shared_prompt_attention


class ResponseForwards:
    """The forwards over every response of a batch (chosen and rejected together), each run at most once and
    only when a term reads it: the policy's (with grad when enabled) and the reference's (without)."""

    def __init__(self, ctx: StepContext, batch: PreferenceBatch):
        self.ctx, self.batch = ctx, batch
        self.tokens = response_tokens(ctx.policy, batch)

    def per_response(self, per_token: torch.Tensor) -> torch.Tensor:
        """[N] per response token -> [B, n] sums per response."""
        return per_sequence(per_token, self.tokens).view(-1, self.batch.num_responses)

    @cached_property
    def policy_logits(self) -> torch.Tensor:  # [N, V]
        return response_logits(self.ctx.policy, self.tokens, self.ctx.autocast())

    @cached_property
    def policy_logps(self) -> torch.Tensor:  # [B, n] float32
        return self.per_response(response_token_logps(self.policy_logits, self.tokens.labels))

    @cached_property
    def reference_logits(self) -> torch.Tensor:
        """[N, V] at the policy layout's response positions: the reference copy (in its own layout when its
        attention differs), or the adapter-free policy."""
        ctx, batch = self.ctx, self.batch
        with torch.no_grad():
            if ctx.reference is None:
                with ctx.reference_mode():
                    return response_logits(ctx.policy, self.tokens, ctx.autocast())
            same_layout = shared_prompt_attention(ctx.reference, batch) == shared_prompt_attention(
                ctx.policy, batch
            )
            tokens = self.tokens if same_layout else response_tokens(ctx.reference, batch)
            return response_logits(ctx.reference, tokens, ctx.autocast())

    @cached_property
    def reference_logps(self) -> torch.Tensor:  # [B, n]
        return self.per_response(response_token_logps(self.reference_logits, self.tokens.labels))

    def column(self, name: str) -> torch.Tensor | None:
        """A per-response float column the batch carries (scored or judged before training), as [B, n]."""
        value = getattr(self.batch, name, None)
        if value is None:
            return None
        return value.to(device=self.policy_logps.device, dtype=self.policy_logps.dtype)


def _sequence_kl(forwards: ResponseForwards) -> torch.Tensor:
    """SeqKL = Σ_t KL(π_ref ‖ π_θ)_t over each response's positions (note the direction), in chunks."""
    kl = torch.cat(
        [
            kl_per_position(ref_chunk[None], policy_chunk[None])[0]
            for ref_chunk, policy_chunk in zip(
                forwards.reference_logits.split(CHUNK), forwards.policy_logits.split(CHUNK)
            )
        ]
    )
    return forwards.per_response(kl)


def _ref_logps(forwards: ResponseForwards) -> torch.Tensor:
    precomputed = forwards.column("ref_logps")  # scored once before training (training/reference.py)
    return precomputed if precomputed is not None else forwards.reference_logps


@dataclass(frozen=True)
class Term:
    """How a `PreferenceTerms` field is built, and what it reads."""

    build: Callable[[ResponseForwards], torch.Tensor | None]  # None: the batch does not carry it
    reads_reference: bool = False  # a reference forward over the batch, unless its column was precomputed
    precomputable: bool = False  # `train.precompute_ref_logps` may score it once before training
    scored_at_start: bool = False  # the runner always scores it with the run's starting policy π_t
    column: bool = False  # carried by the data's rows (scored or judged before training)
    scored_with_base: bool = False  # the runner scores it with `loss.seqpo_base_path` (else the reference)


TERMS: dict[str, Term] = {
    "ref_logps": Term(_ref_logps, reads_reference=True, precomputable=True, column=True),
    "seq_kl": Term(_sequence_kl, reads_reference=True),  # per-token logits: never precomputed
    "lengths": Term(  # exact counts: never bf16
        lambda f: f.batch.response_lengths.view(-1, f.batch.num_responses).to(f.policy_logps.dtype)
    ),
    "best_index": Term(lambda f: f.batch.ranking[:, 0]),
    "ranking": Term(lambda f: f.batch.ranking),
    "prev_logps": Term(lambda f: f.column("prev_logps"), scored_at_start=True, column=True),  # SPPO's lp_t
    "win_prob": Term(lambda f: f.column("win_prob"), column=True),  # SPPO: judged before the round
    # seqpo's lp_0 under the first stage's starting model, scored once before each stage's training
    "base_logps": Term(lambda f: f.column("base_logps"), column=True, scored_with_base=True),
}


def needs_reference(spec: LossSpec, precomputed: bool = False) -> bool:
    """Whether the loss runs a reference forward each step (`precomputed`: its columns were scored before)."""
    return any(
        TERMS[name].reads_reference and not (precomputed and TERMS[name].precomputable)
        for name in spec.required_terms
    )


def precomputable(spec: LossSpec) -> bool:
    """Whether `train.precompute_ref_logps` removes every reference forward of this loss's steps."""
    reading = [name for name in spec.required_terms if TERMS[name].reads_reference]
    return bool(reading) and all(TERMS[name].precomputable for name in reading)


def scored_at_start(spec: LossSpec) -> list[str]:
    """The columns the runner scores with the run's starting policy before training (SPPO's prev_logps)."""
    return [name for name in spec.required_terms if TERMS[name].scored_at_start]


def scored_with_base(spec: LossSpec) -> list[str]:
    """The columns the runner scores with `loss.seqpo_base_path` before training (seqpo's base_logps)."""
    return [name for name in spec.required_terms if TERMS[name].scored_with_base]


def carries_columns(spec: LossSpec, batch: PreferenceBatch) -> bool:
    """Whether the batch has every scored/judged column the loss reads that no forward can replace
    (held-out rows have no win_prob, so the evaluator reports SPPO's metrics without its loss)."""
    return all(
        getattr(batch, name, None) is not None
        for name in spec.required_terms
        if TERMS[name].column and not TERMS[name].reads_reference
    )


def preference_terms(
    ctx: StepContext, batch: PreferenceBatch, forwards: ResponseForwards | None = None
) -> PreferenceTerms:
    """`PreferenceTerms` with the policy's log-probs and exactly the terms the loss asks for (`forwards`: the
    batch's `ResponseForwards` when the caller reads them too, e.g. the in-dataset KL)."""
    if ctx.spec.kind != "sppo" and bool((batch.ranking[:, 0] < 0).any()):
        raise ValueError(
            f"loss {ctx.spec.name!r} trains on preference orders, and this batch has rows without one "
            "(SPPO self-play rows, which carry win_probs): train them with loss.name=sppo"
        )
    forwards = forwards or ResponseForwards(ctx, batch)
    policy_logps = forwards.policy_logps  # first: the policy forward precedes any reference forward
    terms = {name: TERMS[name].build(forwards) for name in ctx.spec.required_terms}
    missing = [name for name, value in terms.items() if value is None]
    if missing:
        raise ValueError(
            f"loss {ctx.spec.name!r} needs {missing}, which this preference data does not provide "
            "(sppo trains on rows with win_probs, which `spo-ray iterate` builds each round)"
        )
    return PreferenceTerms(policy_logps=policy_logps, **terms)


def policy_response_logps(ctx: StepContext, batch: PreferenceBatch) -> torch.Tensor:
    """[B, n] lp_θ of every response of the batch, in one policy forward (with grad when enabled)."""
    return ResponseForwards(ctx, batch).policy_logps


def reference_response_logps(ctx: StepContext, batch: PreferenceBatch) -> torch.Tensor:
    """[B, n] lp_ref of every response of the batch (no grad): the reference copy, or the adapter-free policy."""
    return ResponseForwards(ctx, batch).reference_logps
