"""Each preference loss equals its SPEC.md §2 formula (recomputed here with plain `math`) and has the right gradient."""

from __future__ import annotations

import math

import pytest
import torch

from spo_ray.losses import (
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    rdpo_loss,
    simpo_loss,
    spo_best_of_n_loss,
    spo_pair_weights,
    spo_pairwise_loss,
    spo_ranked_loss,
    spo_weighted_pairwise_loss,
    sppo_loss,
    tdpo_loss,
)

BATCH = 6


def _randn(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """policy_chosen, policy_rejected, ref_chosen, ref_rejected: sequence log-probs [B] (negative)."""
    return tuple(-_randn(BATCH, seed=seed).abs() * 5 for seed in range(4))


def _h(pc: float, pr: float, rc: float, rr: float) -> float:
    return (pc - rc) - (pr - rr)


def _grad_check(fn, *tensors: torch.Tensor) -> None:
    inputs = tuple(t.detach().clone().requires_grad_() for t in tensors)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# --- SPO (§2.1) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_spo_pairwise_loss_is_minus_log_sigmoid_of_scaled_margin_over_alpha(alpha):
    chosen, rejected, _, _ = _pairs()
    loss = spo_pairwise_loss(chosen, rejected, alpha)
    expected = [-_log_sigmoid(alpha * (w - lo)) / alpha for w, lo in zip(chosen.tolist(), rejected.tolist())]
    assert loss.shape == (BATCH,)
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    _grad_check(lambda w, lo: spo_pairwise_loss(w, lo, alpha), chosen, rejected)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_spo_best_of_n_loss_is_minus_log_softmax_of_the_best_over_alpha(alpha):
    logps = -_randn(BATCH, 4).abs() * 4
    best = torch.tensor([0, 1, 2, 3, 1, 0])
    loss = spo_best_of_n_loss(logps, best, alpha)
    expected = []
    for row, b in zip(logps.tolist(), best.tolist()):
        normalizer = sum(math.exp(alpha * lp) for lp in row)
        expected.append(-math.log(math.exp(alpha * row[b]) / normalizer) / alpha)
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    _grad_check(lambda lp: spo_best_of_n_loss(lp, best, alpha), logps)


def _plackett_luce_nll(row: list[float], order: list[int], alpha: float) -> float:
    total = 0.0
    for k in range(len(order) - 1):
        normalizer = sum(math.exp(alpha * row[j]) for j in order[k:])
        total += math.log(math.exp(alpha * row[order[k]]) / normalizer)
    return -total / alpha


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_spo_ranked_loss_is_the_plackett_luce_negative_log_likelihood_over_alpha(alpha):
    logps = -_randn(BATCH, 5).abs() * 2
    gen = torch.Generator().manual_seed(1)
    ranking = torch.stack([torch.randperm(5, generator=gen) for _ in range(BATCH)])
    loss = spo_ranked_loss(logps, ranking, alpha)
    expected = [_plackett_luce_nll(r, o, alpha) for r, o in zip(logps.tolist(), ranking.tolist())]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    _grad_check(lambda lp: spo_ranked_loss(lp, ranking, alpha), logps)


def test_partial_ranking_is_top_k_plackett_luce_over_all_n_responses():
    """Enumerable check: P(the ranking starts with τ_1..τ_k) = Σ of the full Plackett–Luce probabilities
    of every ranking that starts that way, so unranked responses stay in every denominator."""
    import itertools

    alpha, n = 1.5, 5
    logps = -_randn(3, n).abs() * 2
    ranking = torch.tensor([[3, 1, 4, 0, 2], [2, 0, -1, -1, -1], [4, -1, -1, -1, -1]])
    loss = spo_ranked_loss(logps, ranking, alpha)
    for row, (lp, prefix) in enumerate(zip(logps.tolist(), ranking.tolist())):
        prefix = [i for i in prefix if i >= 0]
        rest = [i for i in range(n) if i not in prefix]
        # α·loss = −log P, so P(prefix) = Σ over completions of exp(−α·NLL(full ranking))
        marginal = sum(
            math.exp(-alpha * _plackett_luce_nll(lp, prefix + list(tail), alpha))
            for tail in itertools.permutations(rest)
        )
        assert loss[row].item() == pytest.approx(-math.log(marginal) / alpha, rel=1e-12)
    # A best-of-n row ([best, -1, ...]) is the best-of-n loss, not zero.
    assert loss[2].item() == pytest.approx(
        spo_best_of_n_loss(logps[2:], ranking[2:, 0], alpha).item(), rel=1e-12
    )
    assert loss[2].item() > 0.1
    # Unranked responses get a gradient (they compete for every ranked slot) and nothing is NaN.
    grad = torch.autograd.functional.jacobian(lambda lp: spo_ranked_loss(lp, ranking, alpha).sum(), logps)
    assert torch.isfinite(grad).all()
    assert bool((grad[1, [1, 3, 4]] > 0).all()) and bool((grad[2, :4] > 0).all())
    _grad_check(lambda lp: spo_ranked_loss(lp, ranking, alpha), logps)


def test_ranking_with_padding_before_a_ranked_column_is_refused():
    with pytest.raises(ValueError, match="padding must come after"):
        spo_ranked_loss(torch.zeros(1, 4), torch.tensor([[2, -1, 0, -1]]), 1.0)


def test_spo_losses_agree_on_two_responses():
    chosen, rejected, _, _ = _pairs()
    logps = torch.stack([rejected, chosen], dim=1)  # the chosen response in column 1
    pairwise = spo_pairwise_loss(chosen, rejected, 0.7)
    best_of_n = spo_best_of_n_loss(logps, torch.ones(BATCH, dtype=torch.long), 0.7)
    ranked = spo_ranked_loss(logps, torch.tensor([[1, 0]] * BATCH), 0.7)
    assert torch.allclose(pairwise, best_of_n, rtol=1e-12, atol=0)
    assert torch.allclose(pairwise, ranked, rtol=1e-12, atol=0)


def test_spo_loss_needs_no_reference_and_rejects_nonpositive_alpha():
    chosen, rejected, _, _ = _pairs()
    with pytest.raises(ValueError, match="alpha"):
        spo_pairwise_loss(chosen, rejected, 0.0)


def test_spo_pair_weight_is_exp_of_gamma_times_the_pairs_centred_per_token_loglik():
    chosen = torch.tensor([-2.0, -10.0, -3.0], dtype=torch.float64)
    rejected = torch.tensor([-4.0, -12.0, -9.0], dtype=torch.float64)
    chosen_len, rejected_len = torch.tensor([2, 4, 1]), torch.tensor([2, 4, 5])
    # per-token pair log-likelihoods: -6/4 = -1.5, -22/8 = -2.75, -12/6 = -2; batch mean -6.25/3
    loglik = [-1.5, -2.75, -2.0]
    mean = sum(loglik) / 3
    for gamma in (0.5, 2.0):
        expected = torch.tensor([math.exp(gamma * (v - mean)) for v in loglik], dtype=torch.float64)
        weights = spo_pair_weights(chosen, rejected, chosen_len, rejected_len, gamma)
        assert torch.allclose(weights, expected, rtol=1e-12, atol=0)
        assert math.isclose(float(weights.log().mean()), 0.0, abs_tol=1e-12)  # geometric mean 1
        weighted = spo_weighted_pairwise_loss(chosen, rejected, chosen_len, rejected_len, 0.7, gamma)
        assert torch.allclose(
            weighted, expected * spo_pairwise_loss(chosen, rejected, 0.7), rtol=1e-12, atol=0
        )
    assert weights[0] > weights[2] > weights[1]  # the pair the model finds least likely counts least
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        spo_pair_weights(chosen, rejected, chosen_len, rejected_len, -1.0)


def test_spo_pair_weighting_with_gamma_zero_is_plain_spo_exactly():
    chosen, rejected, _, _ = _pairs()
    lengths = torch.randint(1, 30, (2, BATCH), generator=torch.Generator().manual_seed(7))
    weighted = spo_weighted_pairwise_loss(chosen, rejected, lengths[0], lengths[1], 0.7, 0.0)
    assert torch.equal(weighted, spo_pairwise_loss(chosen, rejected, 0.7))


def test_spo_pair_weights_are_detached_so_the_gradient_is_the_weighted_plain_gradient():
    chosen, rejected, _, _ = _pairs()
    lengths = torch.randint(1, 30, (2, BATCH), generator=torch.Generator().manual_seed(8))
    gamma, alpha = 1.5, 0.7
    weights = spo_pair_weights(chosen, rejected, lengths[0], lengths[1], gamma)
    assert not torch.allclose(weights, torch.ones_like(weights), atol=0.1)  # the weights are not trivial

    def grads(loss_fn):
        c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
        loss_fn(c, r).sum().backward()
        return c.grad, r.grad

    weighted = grads(lambda c, r: spo_weighted_pairwise_loss(c, r, lengths[0], lengths[1], alpha, gamma))
    plain_times_weights = grads(lambda c, r: weights * spo_pairwise_loss(c, r, alpha))
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    assert not spo_pair_weights(c, r, lengths[0], lengths[1], gamma).requires_grad
    for got, expected in zip(weighted, plain_times_weights):
        assert torch.allclose(got, expected, rtol=1e-12, atol=0)


# --- DPO family (§2.4) --------------------------------------------------------------------------------------


def test_dpo_loss_is_minus_log_sigmoid_of_beta_h():
    terms = _pairs()
    loss = dpo_loss(*terms, 0.1)
    expected = [-_log_sigmoid(0.1 * _h(*row)) for row in zip(*(t.tolist() for t in terms))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    _grad_check(lambda *t: dpo_loss(*t, 0.1), *terms)


def test_ipo_loss_is_squared_distance_of_h_to_one_over_two_beta():
    terms = _pairs()
    loss = ipo_loss(*terms, 0.25)
    expected = [(_h(*row) - 1 / (2 * 0.25)) ** 2 for row in zip(*(t.tolist() for t in terms))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    _grad_check(lambda *t: ipo_loss(*t, 0.25), *terms)


def test_length_normalized_ipo_divides_each_log_ratio_by_its_token_count_as_trl_does():
    pc, pr, rc, rr = _pairs()
    chosen_len = torch.tensor([3, 10, 1, 7, 300, 2])
    rejected_len = torch.tensor([5, 1, 4, 7, 20, 9])
    loss = ipo_loss(pc, pr, rc, rr, 0.25, chosen_len, rejected_len)
    expected = [
        ((w - rw) / lw - (lo - rl) / ll - 1 / (2 * 0.25)) ** 2
        for w, lo, rw, rl, lw, ll in zip(
            pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), chosen_len.tolist(), rejected_len.tolist()
        )
    ]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    assert not torch.allclose(loss, ipo_loss(pc, pr, rc, rr, 0.25))


def test_cdpo_loss_is_label_smoothed_dpo():
    terms, beta, eps = _pairs(), 0.2, 0.1
    loss = cdpo_loss(*terms, beta, eps)
    expected = [
        -(1 - eps) * _log_sigmoid(beta * _h(*row)) - eps * _log_sigmoid(-beta * _h(*row))
        for row in zip(*(t.tolist() for t in terms))
    ]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    assert torch.allclose(cdpo_loss(*terms, beta, 0.0), dpo_loss(*terms, beta), rtol=1e-12, atol=0)
    _grad_check(lambda *t: cdpo_loss(*t, beta, eps), *terms)


def test_rdpo_loss_is_the_unbiased_flip_corrected_dpo():
    terms, beta, eps = _pairs(), 0.2, 0.2
    loss = rdpo_loss(*terms, beta, eps)
    expected = [
        ((1 - eps) * -_log_sigmoid(beta * _h(*row)) - eps * -_log_sigmoid(-beta * _h(*row))) / (1 - 2 * eps)
        for row in zip(*(t.tolist() for t in terms))
    ]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    # Unbiased under flips: the expectation over a flip with probability ε is the clean DPO loss.
    pc, pr, rc, rr = terms
    flipped = rdpo_loss(pr, pc, rr, rc, beta, eps)
    assert torch.allclose((1 - eps) * loss + eps * flipped, dpo_loss(*terms, beta), rtol=1e-12, atol=0)
    _grad_check(lambda *t: rdpo_loss(*t, beta, eps), *terms)
    with pytest.raises(ValueError, match="epsilon"):
        rdpo_loss(*terms, beta, 0.5)


def test_simpo_loss_uses_length_normalized_logps_and_a_margin():
    pc, pr, _, _ = _pairs()
    chosen_len, rejected_len = torch.tensor([3, 7, 1, 12, 5, 9]), torch.tensor([4, 2, 8, 6, 11, 1])
    beta, gamma = 2.0, 0.5
    loss = simpo_loss(pc, pr, chosen_len, rejected_len, beta, gamma)
    expected = [
        -_log_sigmoid(beta * w / lw - beta * lo / ll - gamma)
        for w, lo, lw, ll in zip(pc.tolist(), pr.tolist(), chosen_len.tolist(), rejected_len.tolist())
    ]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    _grad_check(lambda w, lo: simpo_loss(w, lo, chosen_len, rejected_len, beta, gamma), pc, pr)


@pytest.mark.parametrize(
    "alpha, stop_grad_chosen", [(0.5, True), (0.8, True), (1.0, False)], ids=["tdpo2", "tdpo2_a0.8", "tdpo1"]
)
def test_tdpo_loss_is_the_official_formula_with_its_alpha_weighted_sequence_kl_gap(alpha, stop_grad_chosen):
    """TDPO2: −log σ(β(h − α(SeqKL_l − sg SeqKL_w))); TDPO1: α = 1 and no stop-gradient (official tdpo_loss)."""
    terms = _pairs()
    chosen_kl, rejected_kl = _randn(BATCH, seed=7).abs(), _randn(BATCH, seed=8).abs()
    beta = 0.3
    loss = tdpo_loss(*terms, chosen_kl, rejected_kl, beta, alpha, stop_grad_chosen)
    expected = [
        -_log_sigmoid(beta * (_h(*row) - alpha * (kl_l - kl_w)))
        for *row, kl_w, kl_l in zip(*(t.tolist() for t in terms), chosen_kl.tolist(), rejected_kl.tolist())
    ]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    chosen_kl_leaf, rejected_kl_leaf = (
        chosen_kl.clone().requires_grad_(),
        rejected_kl.clone().requires_grad_(),
    )
    loss = tdpo_loss(*terms, chosen_kl_leaf, rejected_kl_leaf, beta, alpha, stop_grad_chosen)
    chosen_grad, rejected_grad = torch.autograd.grad(
        loss.sum(), [chosen_kl_leaf, rejected_kl_leaf], allow_unused=True, materialize_grads=True
    )
    assert bool((chosen_grad == 0).all()) == stop_grad_chosen
    assert bool((rejected_grad > 0).all())  # a larger SeqKL on the rejected response raises the loss
    # Finite differences see through a stop-gradient, so check SeqKL(y_w) only where it has a gradient.
    if stop_grad_chosen:
        _grad_check(lambda *t: tdpo_loss(*t[:4], chosen_kl, t[4], beta, alpha), *terms, rejected_kl)
    else:
        _grad_check(lambda *t: tdpo_loss(*t, beta, alpha, False), *terms, chosen_kl, rejected_kl)


def test_registry_tdpo_is_tdpo2_with_loss_tdpo_alpha_and_tdpo1_is_reachable():
    from spo_ray.losses import LossParams, PreferenceTerms, get_loss

    pc, pr, rc, rr = _pairs()
    kl_w, kl_l = _randn(BATCH, seed=7).abs(), _randn(BATCH, seed=8).abs()
    terms = PreferenceTerms(
        policy_logps=torch.stack([pc, pr], 1),
        ref_logps=torch.stack([rc, rr], 1),
        seq_kl=torch.stack([kl_w, kl_l], 1),
    )
    params = LossParams(beta=0.3, tdpo_alpha=0.25)
    assert torch.equal(
        get_loss("tdpo").compute(terms, params), tdpo_loss(pc, pr, rc, rr, kl_w, kl_l, 0.3, 0.25)
    )
    assert LossParams().tdpo_alpha == 0.5  # the official default
    tdpo1 = get_loss("tdpo1").compute(terms, params)
    assert torch.equal(tdpo1, tdpo_loss(pc, pr, rc, rr, kl_w, kl_l, 0.3, 1.0, stop_grad_chosen=False))
    assert not torch.allclose(tdpo1, get_loss("tdpo").compute(terms, params))


def test_sppo_loss_regresses_the_log_ratio_onto_the_centered_win_probability():
    policy, prev = _pairs()[:2]
    win_prob = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7, 1.0], dtype=torch.float64)
    eta = 4.0
    loss = sppo_loss(policy, prev, win_prob, eta)
    expected = [
        (lp - lt - eta * (p - 0.5)) ** 2
        for lp, lt, p in zip(policy.tolist(), prev.tolist(), win_prob.tolist())
    ]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    _grad_check(lambda lp: sppo_loss(lp, prev, win_prob, eta), policy)


def test_losses_stay_finite_for_extreme_margins():
    huge = torch.tensor([1e4, -1e4], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.isfinite(spo_pairwise_loss(huge, zero, 2.0)).all()
    assert torch.isfinite(dpo_loss(huge, zero, zero, zero, 1.0)).all()
    assert torch.isfinite(
        spo_ranked_loss(torch.stack([huge, zero], 1), torch.tensor([[0, 1], [0, 1]]), 2.0)
    ).all()
