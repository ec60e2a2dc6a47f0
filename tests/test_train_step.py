"""The training step's math, without Ray: the loss it returns is the formula of SPEC.md §2 on real logits."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer

from spo_ray.data import collate_preference_batch, response_logps
from spo_ray.losses import LossParams, LossSpec, get_loss
from spo_ray.training.context import StepContext
from spo_ray.training.optim import lr_factor
from spo_ray.training.samples import SampleBatch
from spo_ray.training.step import compute_step
from spo_ray.training.terms import needs_reference


@pytest.fixture(scope="module")
def models(float64_pair, tiny_model_dir):
    return (*float64_pair(0.02), AutoTokenizer.from_pretrained(tiny_model_dir))


def make_rows(tokenizer, prompts, responses):
    """Tokenized rows as the pipeline emits them: prompt ids, n response ids each, ranking best first."""
    rows = {"prompt_ids": [], "response_ids": [], "ranking": [], "example_id": []}
    for i, (prompt, answers) in enumerate(zip(prompts, responses)):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        rows["prompt_ids"].append(np.array(tokenizer(text)["input_ids"]))
        rows["response_ids"].append([np.array(tokenizer(a + "<|im_end|>")["input_ids"]) for a in answers])
        rows["ranking"].append(np.arange(len(answers)))
        rows["example_id"].append(i)
    return {
        key: np.array(value, dtype=object) if key == "response_ids" else value for key, value in rows.items()
    }


def brute_force_logp(model, prompt_ids, response_ids) -> torch.Tensor:
    """Σ log π(response token | prefix), one sequence at a time, no padding anywhere."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logprobs = torch.log_softmax(model(ids).logits[0], -1)
    start = len(prompt_ids)
    return sum(logprobs[t - 1, ids[0, t]] for t in range(start, ids.shape[1]))


def context(policy, reference, loss_name, kl_coef=0.0, estimator="token"):
    return StepContext(
        policy=policy,
        reference=reference,
        reference_mode=None,
        spec=get_loss(loss_name),
        params=LossParams(alpha=0.7, beta=0.3),
        kl_coef=kl_coef,
        kl_estimator=estimator,
        importance_clip=0.0,
    )


PROMPTS = ["Why does the river move?", "Tell me about fresh bread"]
RESPONSES = [["The river moves.", "No."], ["Fresh bread is a good reason to wake.", "Bread."]]


@pytest.mark.parametrize("packing", [False, True])
def test_spo_step_loss_is_the_pairwise_formula_on_exact_log_probs(models, packing):
    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, PROMPTS, RESPONSES)
    batch = collate_preference_batch(rows, tokenizer.pad_token_id, packing=packing)
    out = compute_step(context(policy, reference, "spo"), batch, None)
    expected = []
    for p, (chosen, rejected) in zip(rows["prompt_ids"], rows["response_ids"]):
        margin = brute_force_logp(policy, p, chosen) - brute_force_logp(policy, p, rejected)
        expected.append(-(1 / 0.7) * torch.nn.functional.logsigmoid(0.7 * margin))
    assert out.loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-9)
    assert out.metrics["accuracy"] == pytest.approx(np.mean([e.item() < math.log(2) / 0.7 for e in expected]))


@pytest.mark.parametrize("packing", [False, True])
def test_pair_weighted_spo_step_weights_each_pair_by_its_centred_per_token_log_likelihood(models, packing):
    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, PROMPTS, RESPONSES)
    batch = collate_preference_batch(rows, tokenizer.pad_token_id, packing=packing)
    ctx = context(policy, reference, "spo")
    ctx = dataclasses.replace(ctx, params=dataclasses.replace(ctx.params, pair_weight_gamma=1.5))
    out = compute_step(ctx, batch, None)
    losses, logliks = [], []
    for p, (chosen, rejected) in zip(rows["prompt_ids"], rows["response_ids"]):
        lp_w, lp_l = brute_force_logp(policy, p, chosen), brute_force_logp(policy, p, rejected)
        losses.append(-(1 / 0.7) * torch.nn.functional.logsigmoid(0.7 * (lp_w - lp_l)))
        logliks.append((lp_w + lp_l).item() / (len(chosen) + len(rejected)))  # tokens, eos included
    weights = [math.exp(1.5 * (v - np.mean(logliks))) for v in logliks]
    assert abs(weights[0] - weights[1]) > 0.1  # the pairs get different weights
    expected = np.mean([w * loss.item() for w, loss in zip(weights, losses)])
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)


def test_dpo_step_uses_reference_log_probs(models):
    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, PROMPTS, RESPONSES)
    batch = collate_preference_batch(rows, tokenizer.pad_token_id)
    out = compute_step(context(policy, reference, "dpo"), batch, None)
    expected = []
    for p, (chosen, rejected) in zip(rows["prompt_ids"], rows["response_ids"]):
        h = (brute_force_logp(policy, p, chosen) - brute_force_logp(reference, p, chosen)) - (
            brute_force_logp(policy, p, rejected) - brute_force_logp(reference, p, rejected)
        )
        expected.append(-torch.nn.functional.logsigmoid(0.3 * h))
    assert out.loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-9)


def test_kl_term_adds_kl_coef_times_exact_token_kl_along_online_samples(models):
    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, PROMPTS, RESPONSES)
    batch = collate_preference_batch(rows, tokenizer.pad_token_id)
    prompt = list(rows["prompt_ids"][0])
    samples = [
        SimpleNamespace(
            prompt_token_ids=prompt, token_ids=[300, 301, 302], logprobs=[-1.0, -2.0, -3.0], policy_version=0
        ),
        SimpleNamespace(
            prompt_token_ids=prompt[:-2], token_ids=[400, 5], logprobs=[-1.5, -0.5], policy_version=0
        ),
    ]
    sample_batch = SampleBatch.from_samples(samples, tokenizer.pad_token_id, torch.device("cpu"))
    without = compute_step(context(policy, reference, "spo"), batch, None)
    with_kl = compute_step(context(policy, reference, "spo", kl_coef=0.5), batch, sample_batch)
    exact = []
    for s in samples:
        ids = torch.tensor([list(s.prompt_token_ids) + list(s.token_ids)])
        p_log = torch.log_softmax(policy(ids).logits[0], -1)
        r_log = torch.log_softmax(reference(ids).logits[0], -1)
        positions = range(len(s.prompt_token_ids) - 1, ids.shape[1] - 1)  # logits that predict sampled tokens
        exact.append(sum((p_log[t].exp() * (p_log[t] - r_log[t])).sum() for t in positions))
    expected_kl = torch.stack(exact).mean().item()
    assert with_kl.metrics["kl_token"] == pytest.approx(expected_kl, rel=1e-9)
    assert with_kl.loss.item() == pytest.approx(without.loss.item() + 0.5 * expected_kl, rel=1e-9)
    gap = np.mean(
        [
            np.mean(
                [
                    abs(
                        brute_force_logp(
                            policy, s.prompt_token_ids[: len(s.prompt_token_ids)] + s.token_ids[:k], [tok]
                        ).item()
                        - lp
                    )
                    for k, (tok, lp) in enumerate(zip(s.token_ids, s.logprobs))
                ]
            )
            for s in samples
        ]
    )
    assert with_kl.metrics["rollout_logp_gap"] == pytest.approx(gap, rel=1e-6)


def test_every_registry_loss_with_offline_terms_runs_and_backpropagates(models):
    policy, reference, tokenizer = models
    batch = collate_preference_batch(make_rows(tokenizer, PROMPTS, RESPONSES), tokenizer.pad_token_id)
    for name in ("spo", "spo_best_of_n", "spo_ranked", "dpo", "ipo", "cdpo", "rdpo", "simpo", "tdpo"):
        policy.zero_grad()
        out = compute_step(context(policy, reference, name), batch, None)
        out.loss.backward()
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        assert torch.isfinite(out.loss) and grads and all(torch.isfinite(g).all() for g in grads), name


def test_a_loss_outside_the_registry_needs_only_its_spec_to_train(models):
    # a length-normalized DPO written here: its spec names the terms it reads, and the step builds exactly
    # those (one policy forward, one reference forward) without a line changed in terms, step or collate
    policy, reference, tokenizer = models
    batch = collate_preference_batch(make_rows(tokenizer, PROMPTS, RESPONSES), tokenizer.pad_token_id)

    def per_token_dpo(terms, params):
        ratio = (terms.policy_logps - terms.ref_logps) / terms.lengths
        return -torch.nn.functional.logsigmoid(params.beta * (ratio[:, 0] - ratio[:, 1]))

    spec = LossSpec("per_token_dpo", per_token_dpo, "pairwise", ("ref_logps", "lengths"), per_token_dpo)
    assert needs_reference(spec)
    ctx = StepContext(policy, reference, None, spec, LossParams(beta=0.5), 0.0, "token", 0.0)
    out = compute_step(ctx, batch, None)
    out.loss.backward()
    lp = response_logps(policy(**batch.model_inputs()).logits, batch).view(-1, 2).detach()
    with torch.no_grad():
        lp_ref = response_logps(reference(**batch.model_inputs()).logits, batch).view(-1, 2)
    ratio = (lp - lp_ref) / batch.response_lengths.view(-1, 2)
    expected = -torch.nn.functional.logsigmoid(0.5 * (ratio[:, 0] - ratio[:, 1])).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [lr_factor(step, 4, 20, "cosine") for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:])) and factors[-1] < 0.01
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_factor(12, 4, 20, "constant") == 1.0


def test_precomputed_reference_log_probs_give_the_same_dpo_loss_without_a_reference_forward(
    models, tiny_model_dir
):
    from spo_ray.training.reference import ReferenceScorer

    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, PROMPTS, RESPONSES)
    scorer = ReferenceScorer(str(tiny_model_dir), tokenizer.pad_token_id, "float64")
    table = pa.table(  # what Ray Data hands the scorer: a pyarrow batch of the pipeline's columns
        {
            "prompt_ids": [p.tolist() for p in rows["prompt_ids"]],
            "response_ids": [[r.tolist() for r in example] for example in rows["response_ids"]],
            "ranking": [r.tolist() for r in rows["ranking"]],
            "example_id": rows["example_id"],
        }
    )
    scored_table = scorer(table)
    scored = {
        name: scored_table.column(name).to_numpy(zero_copy_only=False) for name in scored_table.column_names
    }
    for p, responses, ref_logps in zip(rows["prompt_ids"], rows["response_ids"], scored["ref_logps"]):
        for response, value in zip(responses, ref_logps):
            assert value == pytest.approx(brute_force_logp(reference, p, response).item(), abs=1e-9)
    with_reference = compute_step(
        context(policy, reference, "dpo"), collate_preference_batch(rows, tokenizer.pad_token_id), None
    )
    batch = collate_preference_batch(scored, tokenizer.pad_token_id)
    without_reference = compute_step(
        context(policy, None, "dpo"), batch, None
    )  # a forward would fail: no reference
    assert without_reference.loss.item() == pytest.approx(with_reference.loss.item(), rel=1e-9)
