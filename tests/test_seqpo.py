"""Sequential PO (`loss.name=seqpo`): the loss equals its formula, its tabular minimizer is the paper's
closed-form stage optimum, and rows are selected by their dimension labels with clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spo_ray.losses import LossParams, PreferenceTerms, dpo_loss, get_loss, seqpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _columns(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [-(torch.rand(5, generator=gen, dtype=torch.float64) * 20 + 1) for _ in range(6)]


def test_seqpo_loss_equals_its_formula_per_row():
    pw, pl, rw, rl, bw, bl = _columns(0)
    beta, lam = 0.3, 0.7
    got = seqpo_loss(pw, pl, rw, rl, bw, bl, beta, lam)
    for i in range(5):
        h = (pw[i] - rw[i]) - (pl[i] - rl[i])
        prior = beta * ((rw[i] - bw[i]) - (rl[i] - bl[i]))
        assert got[i].item() == pytest.approx(-_log_sigmoid(float(beta * h - lam * prior)), rel=1e-12)


def test_seqpo_is_dpo_at_the_first_stage_and_with_lambda_zero():
    pw, pl, rw, rl, bw, bl = _columns(1)
    dpo = dpo_loss(pw, pl, rw, rl, 0.5)
    torch.testing.assert_close(seqpo_loss(pw, pl, rw, rl, rw, rl, 0.5, 2.0), dpo)  # π_0 = π_{k-1}
    torch.testing.assert_close(seqpo_loss(pw, pl, rw, rl, bw, bl, 0.5, 0.0), dpo)
    assert not torch.allclose(seqpo_loss(pw, pl, rw, rl, bw, bl, 0.5, 1.0), dpo)
    with pytest.raises(ValueError, match="seqpo_lambda"):
        seqpo_loss(pw, pl, rw, rl, bw, bl, 0.5, -1.0)


def test_registry_entry_reads_ref_and_base_logps():
    spec = get_loss("seqpo")
    assert spec.kind == "pairwise" and spec.required_terms == ("ref_logps", "base_logps")
    pw, pl, rw, rl, bw, bl = _columns(2)
    terms = PreferenceTerms(
        policy_logps=torch.stack([pw, pl], 1),
        ref_logps=torch.stack([rw, rl], 1),
        base_logps=torch.stack([bw, bl], 1),
    )
    params = LossParams(beta=0.2, seqpo_lambda=0.4)
    torch.testing.assert_close(spec.compute(terms, params), seqpo_loss(pw, pl, rw, rl, bw, bl, 0.2, 0.4))
    with pytest.raises(ValueError, match="base_logps"):
        spec.compute(PreferenceTerms(terms.policy_logps, ref_logps=terms.ref_logps), params)


def _population_minimizer(ref: torch.Tensor, base: torch.Tensor, reward: torch.Tensor, beta, lam):
    """argmin over a free distribution on K responses of the expected seqpo loss, every ordered pair (i, j)
    compared once, labelled by Bradley–Terry on `reward` (P(i ≻ j) = σ(r_i − r_j))."""
    k = len(reward)
    i, j = torch.triu_indices(k, k, 1)
    p_ij = torch.sigmoid(reward[i] - reward[j])
    logits = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lp = torch.log_softmax(logits, 0)
        forward = seqpo_loss(lp[i], lp[j], ref[i], ref[j], base[i], base[j], beta, lam)
        backward = seqpo_loss(lp[j], lp[i], ref[j], ref[i], base[j], base[i], beta, lam)
        loss = (p_ij * forward + (1 - p_ij) * backward).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return torch.softmax(logits.detach(), 0)


def test_population_minimizer_is_the_closed_form_stage_optimum():
    """Stage 1 (DPO from π_0 on r1) gives π_1 ∝ π_0·exp(r1/β); stage 2's minimizer is
    π_2 ∝ π_1·exp((r2 + λ·r1)/β) = π_0·exp(((1+λ)·r1 + r2)/β), not DPO's π_1·exp(r2/β)."""
    gen = torch.Generator().manual_seed(3)
    k, beta, lam = 5, 0.8, 0.5
    pi0 = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    r1, r2 = (torch.randn(k, generator=gen, dtype=torch.float64) for _ in range(2))
    lp0 = pi0.log()
    pi1 = _population_minimizer(lp0, lp0, r1, beta, lam)
    torch.testing.assert_close(pi1, torch.softmax(lp0 + r1 / beta, 0), atol=1e-5, rtol=0)
    pi2 = _population_minimizer(pi1.log(), lp0, r2, beta, lam)
    closed_form = torch.softmax(lp0 + ((1 + lam) * r1 + r2) / beta, 0)
    torch.testing.assert_close(pi2, closed_form, atol=1e-5, rtol=0)
    assert (pi2 - torch.softmax(pi1.log() + r2 / beta, 0)).abs().sum() > 0.05  # plain DPO differs


# -- dimension labels -------------------------------------------------------------------------------


def _row(dimension=None, dimensions=None, tag=""):
    row = {"prompt": f"Name a color{tag}.", "chosen": "Red.", "rejected": "Blue."}
    if dimension is not None:
        row["dimension"] = dimension
    if dimensions is not None:
        row["dimensions"] = dimensions
    return row


def test_row_dimensions_reads_one_or_several_labels_and_names_bad_ones():
    from spo_ray.data.schema import RowProblem, row_dimensions

    assert row_dimensions(_row("helpful")) == ["helpful"]
    assert row_dimensions(_row(dimensions=["helpful", "harmless"])) == ["helpful", "harmless"]
    for bad, field in [(_row(), "dimension"), (_row(3), "dimension"), (_row(dimensions=[]), "dimensions")]:
        with pytest.raises(RowProblem) as info:
            row_dimensions(bad)
        assert info.value.field == field and info.value.reason == "bad_dimension"


def test_data_dimension_keeps_its_rows_and_stops_at_an_unlabelled_one(tiny_model_dir, tmp_path, ray_runtime):
    from spo_ray.config import DataConfig
    from spo_ray.data import prepare_preference_data
    from spo_ray.errors import DataError

    rows = [
        _row("helpful", tag="1"),
        _row("harmless", tag="2"),
        _row(dimensions=["helpful", "harmless"], tag="3"),
    ]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = {"max_length": 64, "max_prompt_length": 32}
    helpful = prepare_preference_data(
        DataConfig([str(good)], dimension="helpful", **kw), str(tiny_model_dir), str(tmp_path / "a")
    )
    harmless = prepare_preference_data(
        DataConfig([str(good)], dimension="harmless", **kw), str(tiny_model_dir), str(tmp_path / "b")
    )
    everything = prepare_preference_data(
        DataConfig([str(good)], **kw), str(tiny_model_dir), str(tmp_path / "c")
    )
    assert (helpful.num_train, harmless.num_train, everything.num_train) == (2, 2, 3)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "".join(json.dumps(r) + "\n" for r in [rows[0], _row(tag="4"), _row(dimensions="helpful")])
    )
    with pytest.raises(DataError) as info:
        prepare_preference_data(
            DataConfig([str(bad)], dimension="helpful", **kw), str(tiny_model_dir), str(tmp_path / "d")
        )
    assert str(info.value).startswith(f"{bad}:2: dimension: no usable preference dimension label")
    assert "'dimension' label" in str(info.value)
    skipped = prepare_preference_data(
        DataConfig([str(bad)], dimension="helpful", on_bad_rows="skip", **kw),
        str(tiny_model_dir),
        str(tmp_path / "e"),
    )
    assert skipped.num_train == 1 and skipped.bad_rows == {"bad_dimension": 2}
