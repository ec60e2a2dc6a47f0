"""The global-KL estimators of SPEC.md §2.2 against the exact gradient of an enumerable autoregressive model.

The model: vocabulary 3, responses of 3 tokens after a 1-token prompt, and a free logit vector for every
prefix (13 prefixes x 3 logits), so all 27 responses and their probabilities can be enumerated. The exact
KL(π_θ ‖ π_ref) over sequences and its gradient come from autograd; each estimator's EXPECTED gradient is
Σ_y π(y) ∇surrogate(y), computed exactly.

Measured (seed 0, float64): `token_unbiased` and `sequence` (constant or leave-one-out baseline) match the
exact gradient to a relative L2 error of ~1e-15. The `token` estimator is biased, by an amount that grows
with the policy's distance from the reference (it drops the O(KL) score-function term of an O(distance)
gradient): policy 0.5 from ref (logit noise std), relative L2 error 0.045, cosine 0.9997; 2.0 from ref,
relative L2 error 1.17, cosine 0.47.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from spo_ray.losses import get_kl_estimator, kl_per_position, kl_regularizer, token_kl, token_logps

VOCAB = 3
LENGTH = 3  # response tokens
PROMPT = 1  # one prompt position in front, masked out


def _prefix_table() -> tuple[torch.Tensor, torch.Tensor]:
    """All responses [27, LENGTH] and, per response position, the row of its prefix in the logit table."""
    responses = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))
    prefix_rows: dict[tuple[int, ...], int] = {}
    for t in range(LENGTH):
        for prefix in itertools.product(range(VOCAB), repeat=t):
            prefix_rows[prefix] = len(prefix_rows)
    rows = torch.tensor([[prefix_rows[tuple(y[:t].tolist())] for t in range(LENGTH)] for y in responses])
    return responses, rows


RESPONSES, PREFIX_ROWS = _prefix_table()
N_PREFIXES = int(PREFIX_ROWS.max()) + 1


class TabularLM:
    """A free logit vector per prefix; `logits(responses)` lays them out like a causal LM's aligned logits."""

    def __init__(self, table: torch.Tensor, prompt_logits: torch.Tensor):
        self.table = table  # [N_PREFIXES, VOCAB]
        self.prompt_logits = prompt_logits  # [VOCAB], the (masked) prompt position's logits

    def logits(self, rows: torch.Tensor = PREFIX_ROWS) -> torch.Tensor:
        response_logits = self.table[rows]  # [N, LENGTH, VOCAB]
        prompt = self.prompt_logits.expand(rows.shape[0], PROMPT, VOCAB)
        return torch.cat([prompt, response_logits], dim=1)  # [N, PROMPT + LENGTH, VOCAB]

    def sequence_logps(self) -> torch.Tensor:
        log_probs = torch.log_softmax(self.table[PREFIX_ROWS], dim=-1)  # [27, LENGTH, VOCAB]
        return log_probs.gather(-1, RESPONSES.unsqueeze(-1)).squeeze(-1).sum(-1)  # [27]


SAMPLE_TOKENS = torch.cat([torch.zeros(len(RESPONSES), PROMPT, dtype=torch.long), RESPONSES], dim=1)
MASK = torch.cat([torch.zeros(len(RESPONSES), PROMPT), torch.ones(len(RESPONSES), LENGTH)], dim=1).bool()


def _models(seed: int = 0, distance: float = 0.5) -> tuple[torch.Tensor, TabularLM, TabularLM, TabularLM]:
    """(policy table, policy, reference, lagged rollout policy); the policy sits `distance` away from the ref."""
    gen = torch.Generator().manual_seed(seed)
    ref_table = 1.5 * torch.randn(N_PREFIXES, VOCAB, generator=gen, dtype=torch.float64)
    noise = torch.randn(N_PREFIXES, VOCAB, generator=gen, dtype=torch.float64)
    policy_table = (ref_table + distance * noise).requires_grad_()
    old_table = policy_table.detach() + 0.5 * torch.randn(
        N_PREFIXES, VOCAB, generator=gen, dtype=torch.float64
    )
    prompt_logits = 50.0 * torch.randn(VOCAB, generator=gen, dtype=torch.float64)  # garbage, masked out
    return (
        policy_table,
        TabularLM(policy_table, prompt_logits),
        TabularLM(ref_table, -prompt_logits),
        TabularLM(old_table, prompt_logits),
    )


def _exact_kl_gradient(policy_table: torch.Tensor, policy: TabularLM, ref: TabularLM) -> torch.Tensor:
    policy_logps, ref_logps = policy.sequence_logps(), ref.sequence_logps()
    exact_kl = (policy_logps.exp() * (policy_logps - ref_logps)).sum()
    (grad,) = torch.autograd.grad(exact_kl, policy_table)
    return grad


def _expected_gradient(
    estimator: str,
    policy_table: torch.Tensor,
    policy: TabularLM,
    ref: TabularLM,
    sampler: TabularLM | None = None,
    **options,
) -> torch.Tensor:
    """Σ_y π_sampler(y) ∇surrogate(y): the estimator's gradient in expectation over samples, exactly."""
    sampler = sampler or policy
    with torch.no_grad():
        sample_probs = sampler.sequence_logps().exp()  # [27]
        behavior = token_logps(sampler.logits(), SAMPLE_TOKENS) if sampler is not policy else None
    if behavior is not None:
        options.setdefault("behavior_logps", behavior)
    out = kl_regularizer(estimator, policy.logits(), ref.logits(), SAMPLE_TOKENS, MASK, **options)
    (grad,) = torch.autograd.grad((sample_probs * out.loss).sum(), policy_table)
    return grad


def _relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((estimate - exact).norm() / exact.norm())


def test_enumerated_model_is_a_distribution_and_token_kl_sums_to_sequence_kl():
    policy_table, policy, ref, _ = _models()
    policy_logps, ref_logps = policy.sequence_logps().detach(), ref.sequence_logps()
    assert float(policy_logps.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    exact_kl = float((policy_logps.exp() * (policy_logps - ref_logps)).sum())
    # KL over sequences = E_y Σ_t KL_t(y_<t): the chain rule the `token` estimator relies on for its value.
    per_sample = token_kl(policy.logits(), ref.logits(), MASK).detach()
    assert float((policy_logps.exp() * per_sample).sum()) == pytest.approx(exact_kl, abs=1e-12)


@pytest.mark.parametrize("estimator", ["token_unbiased", "sequence"])
def test_unbiased_estimators_match_the_exact_kl_gradient_in_expectation(estimator):
    policy_table, policy, ref, _ = _models()
    exact = _exact_kl_gradient(policy_table, policy, ref)
    # Any baseline that does not depend on the sample keeps `sequence` unbiased.
    options = {"baseline": 0.7} if estimator == "sequence" else {}
    expected = _expected_gradient(estimator, policy_table, policy, ref, **options)
    print(
        f"\n`{estimator}` expected gradient vs exact: relative L2 error {_relative_error(expected, exact):.1e}"
    )
    assert torch.allclose(expected, exact, rtol=1e-5, atol=1e-8)
    assert _relative_error(expected, exact) < 1e-10


def test_sequence_estimator_with_leave_one_out_baseline_is_unbiased_over_batches_of_two():
    policy_table, policy, ref, _ = _models()
    exact = _exact_kl_gradient(policy_table, policy, ref)
    with torch.no_grad():
        probs = policy.sequence_logps().exp()
    logits, ref_logits = policy.logits(), ref.logits()
    estimator = get_kl_estimator("sequence")
    expected_batch_loss = torch.zeros((), dtype=torch.float64)
    for first, second in itertools.product(range(len(RESPONSES)), repeat=2):
        pair = torch.tensor([first, second])
        out = estimator(logits[pair], ref_logits[pair], SAMPLE_TOKENS[pair], MASK[pair])  # baseline=None: LOO
        expected_batch_loss = expected_batch_loss + probs[first] * probs[second] * out.loss.mean()
    (expected,) = torch.autograd.grad(expected_batch_loss, policy_table)
    assert _relative_error(expected, exact) < 1e-10


def _token_estimator_bias(distance: float) -> tuple[float, float]:
    policy_table, policy, ref, _ = _models(distance=distance)
    exact = _exact_kl_gradient(policy_table, policy, ref)
    expected = _expected_gradient("token", policy_table, policy, ref)
    cosine = float(torch.nn.functional.cosine_similarity(expected.flatten(), exact.flatten(), dim=0))
    return _relative_error(expected, exact), cosine


def test_token_estimator_is_biased_but_points_the_same_way():
    relative_error, cosine = _token_estimator_bias(distance=0.5)
    print(
        f"\n`token` estimator, policy 0.5 from ref: relative L2 error {relative_error:.3f}, cosine {cosine:.4f}"
    )
    assert relative_error > 0.01
    assert cosine > 0.99


def test_token_estimator_bias_grows_as_the_policy_moves_away_from_the_reference():
    # The dropped score-function term is O(KL) while ∇KL is O(distance): the relative bias grows with distance.
    near_error, _ = _token_estimator_bias(distance=0.25)
    far_error, far_cosine = _token_estimator_bias(distance=2.0)
    print(
        f"\n`token` estimator, policy 2.0 from ref: relative L2 error {far_error:.3f}, cosine {far_cosine:.4f}"
    )
    assert far_error > 3 * near_error


@pytest.mark.parametrize("estimator", ["token", "token_unbiased", "sequence"])
def test_importance_weights_are_one_and_change_nothing_when_samples_are_on_policy(estimator):
    policy_table, policy, ref, _ = _models()
    ref_logits = ref.logits()
    behavior = token_logps(policy.logits(), SAMPLE_TOKENS).detach()
    plain = kl_regularizer(estimator, policy.logits(), ref_logits, SAMPLE_TOKENS, MASK, baseline=0.3)
    weighted = kl_regularizer(
        estimator,
        policy.logits(),
        ref_logits,
        SAMPLE_TOKENS,
        MASK,
        behavior_logps=behavior,
        is_clip=2.0,
        baseline=0.3,
    )
    assert torch.equal(weighted.importance_weight, torch.ones(len(RESPONSES), dtype=torch.float64))
    assert torch.equal(weighted.behavior_logp_gap, torch.zeros(len(RESPONSES), dtype=torch.float64))
    assert torch.allclose(weighted.loss, plain.loss, rtol=0, atol=1e-14)
    (plain_grad,) = torch.autograd.grad(plain.loss.sum(), policy_table)
    (weighted_grad,) = torch.autograd.grad(weighted.loss.sum(), policy_table)
    assert torch.allclose(weighted_grad, plain_grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("estimator", ["token", "token_unbiased", "sequence"])
def test_importance_weighted_expectation_under_a_lagged_policy_equals_the_on_policy_one(estimator):
    policy_table, policy, ref, old = _models()
    on_policy = _expected_gradient(estimator, policy_table, policy, ref, baseline=0.7)
    corrected = _expected_gradient(
        estimator, policy_table, policy, ref, sampler=old, is_clip=1e6, baseline=0.7
    )
    uncorrected = _expected_gradient(estimator, policy_table, policy, ref, sampler=old, baseline=0.7)
    assert _relative_error(corrected, on_policy) < 1e-10
    assert _relative_error(uncorrected, on_policy) > 0.01  # the lag matters, so the check has teeth


def test_truncated_weight_is_the_whole_product_of_ratios_capped_at_c():
    _, policy, ref, old = _models()
    logits = policy.logits().detach()
    behavior = token_logps(old.logits(), SAMPLE_TOKENS)
    out = kl_regularizer(
        "token", logits, ref.logits(), SAMPLE_TOKENS, MASK, behavior_logps=behavior, is_clip=1.2
    )
    ratios = (token_logps(logits, SAMPLE_TOKENS) - behavior).exp()  # [27, PROMPT + LENGTH]
    expected = [min(1.2, math.prod(float(r) for r in row[PROMPT:])) for row in ratios]
    assert out.importance_weight.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(out.importance_weight.max()) == pytest.approx(1.2)  # some products are truncated ...
    assert float(out.importance_weight.min()) < 1.0  # ... and some are below 1, kept exactly
    # Position t's exact KL is weighted by the truncated product of the ratios of the tokens before it (not
    # its own token, whose distribution the exact KL already sums over).
    kl_t = kl_per_position(logits, ref.logits())[:, PROMPT:]
    products = ratios[:, PROMPT:].cumprod(-1)
    prefix_weight = torch.cat([torch.ones(len(RESPONSES), 1), products[:, :-1]], dim=1).clamp(max=1.2)
    assert torch.allclose(out.loss, (prefix_weight * kl_t).sum(-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("estimator", ["token", "token_unbiased", "sequence"])
def test_importance_weights_stay_bounded_by_c_on_long_far_off_samples(estimator):
    """T = 512, c = 2, behaviour logprobs far below the policy's: per-token capping would reach 2^512."""
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab = 3, 512, 11
    policy_logits = torch.randn(batch, length, vocab, generator=gen).requires_grad_()  # float32
    ref_logits = torch.randn(batch, length, vocab, generator=gen)
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[2, 300:] = False  # a shorter sample
    behavior = torch.full((batch, length), -30.0)  # π_θ/π_old ≈ e^28 at every token
    out = kl_regularizer(
        estimator, policy_logits, ref_logits, tokens, mask, behavior_logps=behavior, is_clip=2.0
    )
    assert torch.isfinite(out.loss).all() and torch.isfinite(out.importance_weight).all()
    assert float(out.importance_weight.max()) <= 2.0 + 1e-6
    (grad,) = torch.autograd.grad(out.loss.sum(), policy_logits)
    assert torch.isfinite(grad).all()
    # Every position's weight is at most c too: the loss is at most c times the unweighted one.
    plain = kl_regularizer(estimator, policy_logits.detach(), ref_logits, tokens, mask)
    if estimator != "sequence":  # the token surrogates have nonnegative terms
        assert bool((out.loss <= 2.0 * plain.loss + 1e-3).all())


def test_logged_k1_and_k3_are_unbiased_estimates_of_the_sequence_kl():
    _, policy, ref, _ = _models()
    with torch.no_grad():
        policy_logps, ref_logps = policy.sequence_logps(), ref.sequence_logps()
        probs = policy_logps.exp()
        exact_kl = float((probs * (policy_logps - ref_logps)).sum())
        out = kl_regularizer("sequence", policy.logits(), ref.logits(), SAMPLE_TOKENS, MASK)
    assert float((probs * out.kl_k1).sum()) == pytest.approx(exact_kl, abs=1e-12)
    assert float((probs * out.kl_k3).sum()) == pytest.approx(exact_kl, abs=1e-12)
    assert float((probs * out.kl_token).sum()) == pytest.approx(exact_kl, abs=1e-12)
    assert bool((out.kl_k3 >= 0).all())
    assert float((probs * out.loss).sum()) == pytest.approx(exact_kl, abs=1e-12)  # value of the surrogate


@pytest.mark.parametrize("estimator", ["token", "token_unbiased"])
def test_token_surrogates_keep_the_value_of_the_token_kl(estimator):
    _, policy, ref, _ = _models()
    out = kl_regularizer(estimator, policy.logits(), ref.logits(), SAMPLE_TOKENS, MASK)
    assert torch.allclose(out.loss, out.kl_token, rtol=0, atol=1e-13)


def test_unknown_kl_estimator_names_the_known_ones():
    with pytest.raises(ValueError, match="sequence, token, token_unbiased"):
        get_kl_estimator("k3")


def test_importance_clip_without_behavior_logps_is_an_error():
    _, policy, ref, _ = _models()
    with pytest.raises(ValueError, match="behavior_logps"):
        kl_regularizer("token", policy.logits(), ref.logits(), SAMPLE_TOKENS, MASK, is_clip=2.0)
