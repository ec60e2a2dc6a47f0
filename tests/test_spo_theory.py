"""SPEC.md §2.3 on a tabular policy: the SPO minimizer is softmax(r/α) on the compared set S; DPO's is not.

Setup: 8 responses, 6 of them in S (compared), Bradley–Terry preferences from a reward r on 10^6 pairs
drawn with unequal pair frequencies (kept as a win-count matrix, the sufficient statistic), a non-uniform
π_ref, and free logits minimized by LBFGS in float64, starting from π_ref.

Measured (seed 0), total variation on S:
    SPO to softmax(r/α):            α=0.5: 0.0015   α=1: 0.0009   α=2: 0.0004
    DPO (β=α) to π_ref·exp(r/β):    0.0012 / 0.0005 / 0.0002
    DPO (β=α) to softmax(r/α):      0.545 / 0.533 / 0.525
    SPO entropy on S:               1.572 / 1.729 / 1.775   (log 6 = 1.792)
    SPO best-of-4 at α=1 (10^5 Plackett–Luce draws over 4 of S): 0.0047
    SPO ranked over 4, full / top-2 / top-1 rankings (top-k Plackett–Luce) at α=1: 0.0014 / 0.0017 / 0.0019
    Pair-weighted SPO (γ=2) on the population Bradley–Terry loss: TV < 1e-8 at every α (weights spread 3–6×);
    on pairs with one preference flipped (not Bradley–Terry) the weights move the optimum by TV 0.005
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from spo_ray.losses import (
    LossParams,
    PreferenceTerms,
    dpo_loss,
    get_loss,
    spo_best_of_n_loss,
    spo_pair_weights,
    spo_pairwise_loss,
    spo_ranked_loss,
)

N_RESPONSES = 8  # the policy's whole support
S = torch.arange(6)  # the compared responses
N_PAIRS = 1_000_000
RNG_SEED = 0


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """reward on S [6], ref logits [8], and Bradley–Terry win counts: pairs (winner, loser) with counts."""
    rng = np.random.default_rng(RNG_SEED)
    reward = torch.tensor(rng.normal(0.0, 1.0, len(S)))
    ref_logits = torch.tensor(rng.normal(0.0, 1.5, N_RESPONSES))
    unordered = list(itertools.combinations(S.tolist(), 2))
    pair_frequency = rng.dirichlet(np.ones(len(unordered)))  # some pairs compared far more than others
    comparisons = rng.multinomial(N_PAIRS, pair_frequency)
    winners, losers, counts = [], [], []
    for (i, j), n in zip(unordered, comparisons):
        i_wins = rng.binomial(n, 1.0 / (1.0 + np.exp(-(reward[i] - reward[j]).item())))
        winners += [i, j]
        losers += [j, i]
        counts += [i_wins, n - i_wins]
    return (
        reward,
        ref_logits,
        torch.tensor(winners),
        torch.tensor(losers),
        torch.tensor(counts, dtype=torch.float64),
    )


REWARD, REF_LOGITS, WINNERS, LOSERS, WIN_COUNTS = _problem()


def _minimize(loss_of_logps, start_logits: torch.Tensor) -> torch.Tensor:
    """Minimize loss_of_logps(log_softmax(logits)) over free logits; returns the distribution on S, normalized."""
    return torch.softmax(_minimize_logits(loss_of_logps, start_logits)[S], dim=0)


def _minimize_logits(loss_of_logps, start_logits: torch.Tensor) -> torch.Tensor:
    """The minimizing logits [8] of loss_of_logps(log_softmax(logits)), by LBFGS from `start_logits`."""
    logits = start_logits.clone().requires_grad_()
    optimizer = torch.optim.LBFGS(
        [logits],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = loss_of_logps(torch.log_softmax(logits, dim=0))
        loss.backward()
        return loss

    optimizer.step(closure)
    closure()
    assert logits.grad.abs().max() < 1e-6, "tabular optimization did not converge"
    return logits.detach()


def _spo_pairwise_solution(alpha: float) -> torch.Tensor:
    def loss(logps):
        per_pair = spo_pairwise_loss(logps[WINNERS], logps[LOSERS], alpha)
        return (WIN_COUNTS * per_pair).sum() / N_PAIRS

    return _minimize(loss, REF_LOGITS)


def _dpo_solution(beta: float) -> torch.Tensor:
    ref_logps = torch.log_softmax(REF_LOGITS, dim=0)

    def loss(logps):
        per_pair = dpo_loss(logps[WINNERS], logps[LOSERS], ref_logps[WINNERS], ref_logps[LOSERS], beta)
        return (WIN_COUNTS * per_pair).sum() / N_PAIRS

    return _minimize(loss, REF_LOGITS)


def _total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def _entropy(p: torch.Tensor) -> float:
    return float(-(p * p.log()).sum())


def _target(alpha: float) -> torch.Tensor:
    return torch.softmax(REWARD / alpha, dim=0)


ALPHAS = (0.5, 1.0, 2.0)


@pytest.fixture(scope="module")
def spo_solutions() -> dict[float, torch.Tensor]:
    return {alpha: _spo_pairwise_solution(alpha) for alpha in ALPHAS}


@pytest.mark.parametrize("alpha", ALPHAS)
def test_spo_converges_to_softmax_of_rewards_over_alpha(spo_solutions, alpha):
    tv = _total_variation(spo_solutions[alpha], _target(alpha))
    print(f"\nSPO pairwise, α={alpha}: TV to softmax(r/α) = {tv:.4f}")
    assert tv < 0.02


def test_spo_optimum_is_flatter_for_larger_alpha(spo_solutions):
    entropies = [_entropy(spo_solutions[alpha]) for alpha in ALPHAS]
    print(f"\nSPO entropy on S for α={ALPHAS}: {[round(h, 4) for h in entropies]}")
    assert entropies[0] < entropies[1] < entropies[2]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_dpo_converges_to_reference_tilted_by_rewards_and_misses_the_spo_target(spo_solutions, alpha):
    beta = alpha  # same temperature, so the only difference is the π_ref factor
    dpo = _dpo_solution(beta)
    ref_on_s = torch.softmax(REF_LOGITS[S], dim=0)
    dpo_target = ref_on_s * torch.exp(REWARD / beta)
    dpo_target = dpo_target / dpo_target.sum()
    tv_dpo_own = _total_variation(dpo, dpo_target)
    tv_dpo_spo_target = _total_variation(dpo, _target(alpha))
    tv_spo = _total_variation(spo_solutions[alpha], _target(alpha))
    print(
        f"\nα=β={alpha}: DPO TV to π_ref·exp(r/β) = {tv_dpo_own:.4f}; TV to softmax(r/α): "
        f"DPO {tv_dpo_spo_target:.4f} vs SPO {tv_spo:.4f}"
    )
    assert tv_dpo_own < 0.02
    assert tv_dpo_spo_target > tv_spo + 0.1


def _plackett_luce_rankings(n_rankings: int, size: int, seed: int, top_k: int | None = None):
    """(columns [M, size], rankings [M, size]): random subsets of S and their Plackett–Luce order under
    scores r, best first, as indices into the row's columns; with `top_k`, only the first k are kept
    (the rest -1): a partial ranking of all `size` responses."""
    rng = np.random.default_rng(seed)
    columns = np.zeros((n_rankings, size), dtype=np.int64)
    rankings = np.full((n_rankings, size), -1)
    reward = REWARD.numpy()
    for row in range(n_rankings):
        columns[row] = np.sort(rng.choice(len(S), size=size, replace=False))
        # Sorting reward + Gumbel noise is an exact Plackett–Luce draw.
        order = np.argsort(-(reward[columns[row]] + rng.gumbel(size=size)))
        rankings[row, : top_k or size] = order[: top_k or size]
    return torch.from_numpy(columns), torch.from_numpy(rankings)


def test_best_of_n_spo_converges_to_the_same_softmax_target():
    columns, rankings = _plackett_luce_rankings(100_000, size=4, seed=1, top_k=1)
    best_index = rankings[:, 0]  # the winner's column among the 4 compared responses
    alpha = 1.0
    solution = _minimize(
        lambda logps: spo_best_of_n_loss(logps[columns], best_index, alpha).mean(), REF_LOGITS
    )
    tv = _total_variation(solution, _target(alpha))
    print(f"\nSPO best-of-4, α={alpha}: TV to softmax(r/α) = {tv:.4f}")
    assert tv < 0.02


@pytest.mark.parametrize("top_k", [None, 2, 1], ids=["full", "top2", "best_of_n"])
def test_ranked_spo_with_full_or_partial_rankings_converges_to_the_same_softmax_target(top_k):
    """A top-k ranking is the first k places of a Plackett–Luce draw, so its likelihood keeps the optimum."""
    columns, rankings = _plackett_luce_rankings(100_000, size=4, seed=2, top_k=top_k)
    alpha = 1.0
    solution = _minimize(lambda logps: spo_ranked_loss(logps[columns], rankings, alpha).mean(), REF_LOGITS)
    tv = _total_variation(solution, _target(alpha))
    print(f"\nSPO ranked (Plackett–Luce over 4, top {top_k or 4}), α={alpha}: TV to softmax(r/α) = {tv:.4f}")
    assert tv < 0.02


# --- SPO pair weighting (loss.pair_weight_gamma) ---------------------------------------------------------------

LENGTHS = torch.tensor(np.random.default_rng(3).integers(1, 20, N_RESPONSES))  # tokens per response
# The population loss: each ordered pair counted by its expected Bradley–Terry wins, n_ij · σ(r_i − r_j).
PAIR_TOTALS = WIN_COUNTS.view(-1, 2).sum(1).repeat_interleave(2)  # WINNERS/LOSERS hold (i, j) then (j, i)
POPULATION_COUNTS = PAIR_TOTALS * torch.sigmoid(REWARD[WINNERS] - REWARD[LOSERS])


def _pair_weights(logits: torch.Tensor, gamma: float) -> torch.Tensor:
    logps = torch.log_softmax(logits, dim=0)
    return spo_pair_weights(logps[WINNERS], logps[LOSERS], LENGTHS[WINNERS], LENGTHS[LOSERS], gamma)


def _registry_spo_loss(logps: torch.Tensor, counts: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Σ counts · (the registered `spo` loss with loss.pair_weight_gamma=γ) / N: what training minimizes."""
    terms = PreferenceTerms(
        policy_logps=torch.stack([logps[WINNERS], logps[LOSERS]], dim=1),
        lengths=torch.stack([LENGTHS[WINNERS], LENGTHS[LOSERS]], dim=1),
    )
    per_pair = get_loss("spo").compute(terms, LossParams(alpha=alpha, pair_weight_gamma=gamma))
    return (counts * per_pair).sum() / N_PAIRS


def _weighted_spo_logits(counts: torch.Tensor, alpha: float, gamma: float, rounds: int = 4) -> torch.Tensor:
    """A fixed point of training with detached pair weights: weights from the current policy, then the
    minimizer of the loss with those weights held, repeated; the weights are recomputed at the end."""
    logits = REF_LOGITS
    for _ in range(rounds):
        weights = _pair_weights(logits, gamma)
        logits = _minimize_logits(
            lambda logps, w=weights: (
                (counts * w * spo_pairwise_loss(logps[WINNERS], logps[LOSERS], alpha)).sum() / N_PAIRS
            ),
            logits,
        )
    return logits


@pytest.mark.parametrize("alpha", ALPHAS)
def test_pair_weighted_spo_keeps_the_softmax_optimum_on_bradley_terry_pairs(alpha):
    """Each pair's own expected loss is minimized at softmax(r/α), so positive weights cannot move it."""
    gamma = 2.0
    logits = _weighted_spo_logits(POPULATION_COUNTS, alpha, gamma)
    tv = _total_variation(torch.softmax(logits[S], dim=0), _target(alpha))
    weights = _pair_weights(logits, gamma)
    # the training gradient (the registry's spo, weights recomputed from this policy) vanishes here
    at_solution = logits.clone().requires_grad_()
    _registry_spo_loss(torch.log_softmax(at_solution, dim=0), POPULATION_COUNTS, alpha, gamma).backward()
    print(
        f"\npair-weighted SPO γ={gamma}, α={alpha}: TV to softmax(r/α) = {tv:.2e}, "
        f"weights max/min = {float(weights.max() / weights.min()):.2f}, |grad| = {float(at_solution.grad.abs().max()):.1e}"
    )
    assert float(weights.max() / weights.min()) > 2.0  # the weighting is active, not uniform
    assert at_solution.grad.abs().max() < 1e-6
    assert tv < 1e-4


def test_pair_weights_move_the_optimum_when_pairs_are_not_bradley_terry():
    """The control: flip one pair's preference (no reward explains the data) and the weights do matter."""
    counts = POPULATION_COUNTS.clone()
    counts[0], counts[1] = POPULATION_COUNTS[1], POPULATION_COUNTS[0]
    plain = torch.softmax(_weighted_spo_logits(counts, 1.0, 0.0, rounds=1)[S], dim=0)
    weighted = torch.softmax(_weighted_spo_logits(counts, 1.0, 2.0)[S], dim=0)
    shift = _total_variation(plain, weighted)
    print(
        f"\nnon-Bradley–Terry pairs, α=1: TV between plain and pair-weighted (γ=2) SPO optima = {shift:.4f}"
    )
    assert shift > 1e-3
