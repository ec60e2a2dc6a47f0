"""The loss registry: one `compute(terms, params)` for every loss, clear errors, and preference metrics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spo_ray.losses import (
    LOSSES,
    LossParams,
    PreferenceTerms,
    cdpo_loss,
    dpo_loss,
    get_loss,
    ipo_loss,
    preference_metrics,
    rdpo_loss,
    seqpo_loss,
    simpo_loss,
    spo_best_of_n_loss,
    spo_pair_weights,
    spo_pairwise_loss,
    spo_ranked_loss,
    sppo_loss,
    tdpo_loss,
)
from spo_ray.training.terms import TERMS, needs_reference, precomputable, scored_at_start

B = 5
PARAMS = LossParams(
    alpha=0.7,
    beta=0.2,
    epsilon=0.1,
    gamma=0.3,
    eta=2.0,
    tdpo_alpha=0.4,
    pair_weight_gamma=0.6,
    seqpo_lambda=0.3,
)


def _tensor(*shape: int, seed: int) -> torch.Tensor:
    return -torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10


def _full_terms(n: int) -> PreferenceTerms:
    return PreferenceTerms(
        policy_logps=_tensor(B, n, seed=0),
        ref_logps=_tensor(B, n, seed=1),
        lengths=torch.randint(1, 20, (B, n), generator=torch.Generator().manual_seed(2)),
        best_index=torch.tensor([0, 1, 0, 1, 1]) % n,
        ranking=torch.stack(
            [torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(B)]
        ),
        win_prob=torch.rand(B, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
        prev_logps=_tensor(B, n, seed=4),
        seq_kl=-_tensor(B, n, seed=5) / 10,
        base_logps=_tensor(B, n, seed=6),
    )


def _direct(name: str, t: PreferenceTerms, p: LossParams) -> torch.Tensor:
    """What each registered loss must equal, written out call by call."""
    lp, ref = t.policy_logps, t.ref_logps
    if name == "spo":  # with its pair weight (γ = pair_weight_gamma, not SimPO's gamma)
        weights = spo_pair_weights(lp[:, 0], lp[:, 1], t.lengths[:, 0], t.lengths[:, 1], p.pair_weight_gamma)
        return weights * spo_pairwise_loss(lp[:, 0], lp[:, 1], p.alpha)
    if name == "spo_best_of_n":
        return spo_best_of_n_loss(lp, t.best_index, p.alpha)
    if name == "spo_ranked":
        return spo_ranked_loss(lp, t.ranking, p.alpha)
    if name == "dpo":
        return dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], p.beta)
    if name == "ipo":  # length-normalized by default (TRL)
        return ipo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], p.beta, t.lengths[:, 0], t.lengths[:, 1])
    if name == "cdpo":
        return cdpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], p.beta, p.epsilon)
    if name == "rdpo":
        return rdpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], p.beta, p.epsilon)
    if name == "simpo":
        return simpo_loss(lp[:, 0], lp[:, 1], t.lengths[:, 0], t.lengths[:, 1], p.beta, p.gamma)
    if name == "tdpo":
        return tdpo_loss(
            lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], t.seq_kl[:, 0], t.seq_kl[:, 1], p.beta, p.tdpo_alpha
        )
    if name == "tdpo1":
        return tdpo_loss(
            lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], t.seq_kl[:, 0], t.seq_kl[:, 1], p.beta, 1.0, False
        )
    if name == "sppo":
        return sppo_loss(lp, t.prev_logps, t.win_prob, p.eta).mean(-1)
    if name == "seqpo":
        base = t.base_logps
        return seqpo_loss(
            lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], base[:, 0], base[:, 1], p.beta, p.seqpo_lambda
        )
    raise AssertionError(name)


def test_registry_holds_exactly_the_losses_of_the_spec():
    assert set(LOSSES) == {
        "spo", "spo_best_of_n", "spo_ranked", "dpo", "ipo", "cdpo", "rdpo", "simpo", "tdpo", "tdpo1", "sppo",
        "seqpo",
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_computes_its_function_through_one_signature(name):
    spec = get_loss(name)
    n = 2 if spec.kind == "pairwise" else 4
    terms = _full_terms(n)
    loss = spec.compute(terms, PARAMS)
    assert loss.shape == (B,)
    assert torch.allclose(loss, _direct(name, terms, PARAMS), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_reads_only_its_required_terms(name):
    spec = get_loss(name)
    full = _full_terms(2 if spec.kind == "pairwise" else 4)
    minimal = PreferenceTerms(
        policy_logps=full.policy_logps, **{field: getattr(full, field) for field in spec.required_terms}
    )
    assert torch.equal(spec.compute(minimal, PARAMS), spec.compute(full, PARAMS))


def test_every_required_term_is_a_preference_terms_field():
    term_names = {field.name for field in dataclasses.fields(PreferenceTerms)}
    for spec in LOSSES.values():
        assert set(spec.required_terms) <= term_names, spec.name


def test_every_preference_term_has_one_builder():
    # the one mechanism that builds a loss's terms (training/terms.py) covers every field a loss may name
    assert set(TERMS) == {field.name for field in dataclasses.fields(PreferenceTerms)} - {"policy_logps"}


def test_loss_specs_say_what_the_trainer_must_compute():
    assert not needs_reference(get_loss("spo"))
    assert not needs_reference(get_loss("simpo"))
    assert needs_reference(get_loss("dpo")) and precomputable(get_loss("dpo"))
    assert not needs_reference(get_loss("dpo"), precomputed=True)
    # TDPO's SeqKL reads per-token reference logits: scoring ref_logps before training cannot replace them
    assert needs_reference(get_loss("tdpo")) and not precomputable(get_loss("tdpo"))
    assert needs_reference(get_loss("tdpo"), precomputed=True)
    assert get_loss("sppo").required_terms == ("prev_logps", "win_prob")
    assert scored_at_start(get_loss("sppo")) == ["prev_logps"] and scored_at_start(get_loss("dpo")) == []
    assert {spec.kind for spec in LOSSES.values()} == {"pairwise", "best_of_n", "ranked", "sppo"}


def test_unknown_loss_name_is_an_error_that_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown loss 'orpo'.*spo, spo_best_of_n.*sppo"):
        get_loss("orpo")


def test_missing_or_misshaped_terms_are_errors_that_name_the_field():
    terms = PreferenceTerms(policy_logps=_tensor(B, 2, seed=0))
    with pytest.raises(ValueError, match="'dpo' needs PreferenceTerms.ref_logps"):
        get_loss("dpo").compute(terms, PARAMS)
    with pytest.raises(ValueError, match=r"pairwise: policy_logps must be \[B, 2\]"):
        get_loss("spo").compute(PreferenceTerms(policy_logps=_tensor(B, 3, seed=0)), PARAMS)
    bad_ref = PreferenceTerms(policy_logps=_tensor(B, 2, seed=0), ref_logps=_tensor(B, seed=1))
    with pytest.raises(ValueError, match=r"ref_logps has shape \(5,\), expected \(5, 2\)"):
        get_loss("dpo").compute(bad_ref, PARAMS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", 0.0),
        ("beta", -1.0),
        ("eta", 0.0),
        ("epsilon", 0.5),
        ("epsilon", -0.1),
        ("tdpo_alpha", 0.0),
        ("pair_weight_gamma", -0.1),
    ],
)
def test_loss_params_reject_out_of_range_values_by_name(field, value):
    with pytest.raises(ValueError, match=f"LossParams.{field}"):
        LossParams(**{field: value})


def test_preference_metrics_report_accuracy_and_margin_of_implicit_rewards():
    policy = torch.tensor([[-1.0, -3.0], [-4.0, -2.0]])
    metrics = preference_metrics(PreferenceTerms(policy_logps=policy))
    assert metrics["accuracy"].item() == 0.5
    assert metrics["margin"].item() == pytest.approx((2.0 + -2.0) / 2)
    with_ref = PreferenceTerms(policy_logps=policy, ref_logps=torch.tensor([[-2.0, -1.0], [-6.0, -1.0]]))
    metrics = preference_metrics(with_ref)  # rewards lp − ref: [1, -2] and [2, -1]
    assert metrics["accuracy"].item() == 1.0
    assert metrics["margin"].item() == pytest.approx((3.0 + 3.0) / 2)


def test_preference_metrics_compare_the_preferred_response_with_every_other_one():
    policy = torch.tensor([[-1.0, -3.0, -0.5, -2.0]])
    best_of_n = preference_metrics(PreferenceTerms(policy_logps=policy, best_index=torch.tensor([0])))
    assert best_of_n["accuracy"].item() == 0.0 and best_of_n["margin"].item() == pytest.approx(-0.5)
    # Column 2 is left out of the partial ranking, so it ranks below every ranked one: it still competes.
    ranked = preference_metrics(PreferenceTerms(policy_logps=policy, ranking=torch.tensor([[0, 3, 1, -1]])))
    assert ranked["accuracy"].item() == 0.0 and ranked["margin"].item() == pytest.approx(-0.5)
