"""TRL's metric names (rewards/*, logps/*), the held-out evaluation and the sample metrics, without Ray."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_train_step import PROMPTS, RESPONSES, brute_force_logp, context, make_rows, models  # noqa: F401

from spo_ray.data import collate_preference_batch
from spo_ray.losses import PreferenceTerms, trl_metrics
from spo_ray.training.evaluation import Evaluator, eval_due
from spo_ray.training.samples import SampleBatch
from spo_ray.training.step import compute_step


def test_trl_metrics_are_dpo_trainers_formulas_on_hand_computed_values():
    policy = torch.tensor([[-1.0, -3.0], [-2.0, -1.5]])
    ref = torch.tensor([[-1.5, -2.0], [-2.0, -2.0]])
    out = trl_metrics(PreferenceTerms(policy_logps=policy, ref_logps=ref), beta=0.1)
    # rewards = beta * (policy - ref): chosen [0.05, 0], rejected [-0.1, 0.05]
    assert out["rewards/chosen"].tolist() == pytest.approx([0.05, 0.0])
    assert out["rewards/rejected"].tolist() == pytest.approx([-0.1, 0.05])
    assert out["rewards/margins"].tolist() == pytest.approx([0.15, -0.05])
    assert out["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert out["logps/chosen"].tolist() == [-1.0, -2.0] and out["logps/rejected"].tolist() == [-3.0, -1.5]


def test_trl_metrics_with_more_responses_take_the_ranked_best_as_chosen_and_the_others_mean_as_rejected():
    policy = torch.tensor([[-4.0, -1.0, -2.0]])
    ref = torch.tensor([[-3.0, -2.0, -2.0]])  # rewards / beta: [-1, 1, 0]
    ranking = torch.tensor([[2, 0, 1]])  # column 2 is preferred, and column 1 beats it on reward
    out = trl_metrics(PreferenceTerms(policy_logps=policy, ref_logps=ref, ranking=ranking), beta=0.5)
    assert out["rewards/chosen"].item() == pytest.approx(0.0)
    assert out["rewards/rejected"].item() == pytest.approx(0.5 * (-1 + 1) / 2)
    assert out["rewards/accuracies"].item() == 0.0  # accuracy asks to beat every other response
    assert out["logps/chosen"].item() == -2.0 and out["logps/rejected"].item() == pytest.approx(-2.5)


def test_trl_metrics_without_reference_log_probs_give_only_the_log_probs():
    out = trl_metrics(PreferenceTerms(policy_logps=torch.tensor([[-1.0, -2.0]])), beta=0.1)
    assert sorted(out) == ["logps/chosen", "logps/rejected"]


def test_a_dpo_step_logs_trl_rewards_and_an_spo_step_logs_log_probs(models):  # noqa: F811
    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, PROMPTS, RESPONSES)
    batch = collate_preference_batch(rows, tokenizer.pad_token_id)
    dpo = compute_step(context(policy, reference, "dpo"), batch, None).metrics
    spo = compute_step(context(policy, reference, "spo"), batch, None).metrics
    chosen = [
        brute_force_logp(policy, p, r[0]).item() for p, r in zip(rows["prompt_ids"], rows["response_ids"])
    ]
    ref_chosen = [
        brute_force_logp(reference, p, r[0]).item() for p, r in zip(rows["prompt_ids"], rows["response_ids"])
    ]
    assert dpo["logps/chosen"] == pytest.approx(np.mean(chosen), rel=1e-9)
    assert dpo["rewards/chosen"] == pytest.approx(0.3 * (np.mean(chosen) - np.mean(ref_chosen)), rel=1e-9)
    assert spo["logps/chosen"] == pytest.approx(np.mean(chosen), rel=1e-9)
    assert "rewards/chosen" not in spo  # SPO's step runs no reference forward on the preference batch


def test_entropy_on_samples_is_the_exact_per_token_entropy_of_the_policy(models):  # noqa: F811
    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, PROMPTS, RESPONSES)
    prompt = list(rows["prompt_ids"][0])
    samples = [
        SimpleNamespace(
            prompt_token_ids=prompt, token_ids=[300, 301, 302], logprobs=[-1.0] * 3, policy_version=0
        ),
        SimpleNamespace(
            prompt_token_ids=prompt[:-2], token_ids=[400, 5], logprobs=[-1.0] * 2, policy_version=0
        ),
    ]
    sample_batch = SampleBatch.from_samples(samples, tokenizer.pad_token_id, torch.device("cpu"))
    batch = collate_preference_batch(rows, tokenizer.pad_token_id)
    metrics = compute_step(context(policy, reference, "spo", kl_coef=0.5), batch, sample_batch).metrics
    entropies = []
    for s in samples:
        ids = torch.tensor([list(s.prompt_token_ids) + list(s.token_ids)])
        logp = torch.log_softmax(policy(ids).logits[0], -1)
        for t in range(
            len(s.prompt_token_ids) - 1, ids.shape[1] - 1
        ):  # positions that predict sampled tokens
            entropies.append(-(logp[t].exp() * logp[t]).sum().item())
    assert metrics["entropy/samples"] == pytest.approx(np.mean(entropies), rel=1e-9)
    assert metrics["kl/samples"] == metrics["kl_token"] > 0


EVAL_PROMPTS = [*PROMPTS, "Say something kind", "Count to three", "Name a colour"]
EVAL_RESPONSES = [*RESPONSES, ["You matter.", "No."], ["One, two, three.", "Four."], ["Blue.", "Table."]]


def _eval_table(rows) -> pa.Table:
    return pa.table(
        {
            "example_id": rows["example_id"],
            "prompt_ids": [p.tolist() for p in rows["prompt_ids"]],
            "response_ids": [[r.tolist() for r in example] for example in rows["response_ids"]],
            "ranking": [r.tolist() for r in rows["ranking"]],
        }
    )


def test_evaluation_of_an_spo_run_scores_rewards_against_the_reference_and_leaves_the_rng_alone(models):  # noqa: F811
    policy, reference, tokenizer = models
    rows = make_rows(tokenizer, EVAL_PROMPTS, EVAL_RESPONSES)
    loaded = []

    def load_reference():  # SPO offline loads no reference: the evaluator loads one for its scoring only
        loaded.append(1)
        return reference

    evaluator = Evaluator(
        _eval_table(rows),
        context(policy, None, "spo"),
        batch_size=2,
        rank=0,
        world=1,
        pad_token_id=tokenizer.pad_token_id,
        packing=False,
        device="cpu",
        load_reference=load_reference,
    )
    policy.train()
    torch.manual_seed(3)
    rng_before = torch.random.get_rng_state()
    first = evaluator.evaluate()
    second = evaluator.evaluate()
    assert torch.equal(torch.random.get_rng_state(), rng_before) and policy.training
    assert loaded == [1]  # scored once, at the first evaluation
    chosen, rejected, accurate, losses = [], [], [], []
    for p, (good, bad) in zip(rows["prompt_ids"], rows["response_ids"]):
        lp_good, lp_bad = brute_force_logp(policy, p, good).item(), brute_force_logp(policy, p, bad).item()
        r_good = 0.3 * (lp_good - brute_force_logp(reference, p, good).item())
        r_bad = 0.3 * (lp_bad - brute_force_logp(reference, p, bad).item())
        chosen.append(r_good), rejected.append(r_bad), accurate.append(float(r_good > r_bad))
        losses.append(-np.log(1 / (1 + np.exp(-0.7 * (lp_good - lp_bad)))) / 0.7)  # SPO, alpha 0.7
    assert first["eval/rows"] == 5
    assert first["eval/rewards/chosen"] == pytest.approx(np.mean(chosen), rel=1e-9)
    assert first["eval/rewards/rejected"] == pytest.approx(np.mean(rejected), rel=1e-9)
    assert first["eval/rewards/accuracies"] == pytest.approx(np.mean(accurate))
    assert first["eval/loss"] == pytest.approx(np.mean(losses), rel=1e-9)
    assert {k: v for k, v in second.items() if k != "eval/seconds"} == {
        k: v for k, v in first.items() if k != "eval/seconds"
    }


def test_every_rank_runs_the_same_number_of_eval_batches_and_each_row_counts_once(models):  # noqa: F811
    policy, reference, tokenizer = models
    table = _eval_table(make_rows(tokenizer, EVAL_PROMPTS, EVAL_RESPONSES))
    shards = [
        Evaluator(
            table,
            context(policy, reference, "dpo"),
            batch_size=1,
            rank=rank,
            world=3,
            pad_token_id=tokenizer.pad_token_id,
            packing=False,
            device="cpu",
        )
        for rank in range(3)
    ]
    assert [len(e.batches) for e in shards] == [2, 2, 2]  # 5 rows over 3 ranks: 2, 2 and 1 (+ a weight-0 one)
    taken = sorted(int(i) for e in shards for take, weight in e.batches for i in take[weight.bool().numpy()])
    assert taken == [0, 1, 2, 3, 4]


def test_evaluation_runs_every_eval_every_steps_and_after_the_last():
    assert [s for s in range(1, 11) if eval_due(s, 10, 4)] == [4, 8, 10]
    assert [s for s in range(1, 11) if eval_due(s, 10, 0)] == [10]


def test_eval_lines_are_written_whatever_log_every_says_and_samples_go_to_samples_jsonl(tmp_path):
    from spo_ray.training.metrics import MetricsLogger, read_metrics, read_samples

    settings = SimpleNamespace(
        log_every=5, progress=True, wandb_mode="disabled", wandb_project="spo_ray", samples_every=2
    )
    logger = MetricsLogger(str(tmp_path), settings, {}, total_steps=4, start_step=0)
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": 0.9, "eval/loss": 0.5, "eval/rewards/accuracies": 0.75})
    row = {"step": 2, "policy_version": 1, "prompt": "Hi", "completion": "Hello.", "finish_reason": "stop"}
    logger.log_samples(2, [row])
    logger.log(3, {"loss": 0.8})
    assert logger.progress.postfix.endswith(
        "eval/loss=0.5, eval/rewards/accuracies=0.75"
    )  # kept after step 2
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [2] and read_samples(tmp_path) == [row]
    resumed = MetricsLogger(str(tmp_path), settings, {}, total_steps=4, start_step=1)  # a resume from step 1
    resumed.close()
    assert read_samples(tmp_path) == [] and read_metrics(tmp_path) == []
