"""Exact evaluation on the synthetic expert task, reference fitting, and the plots."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spo_ray.eval.plots import plot_curves, plot_expert_distributions
from spo_ray.tasks.synthetic_expert.evaluate import (
    encode_candidates,
    entropy,
    evaluate_expert,
    expert_metrics,
    kl_divergence,
    response_distribution,
    response_logprobs,
    total_variation,
)
from spo_ray.tasks.synthetic_expert.reference import fit_reference
from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask


@pytest.fixture(scope="module")
def task() -> SyntheticExpertTask:
    return SyntheticExpertTask.build(seed=0)


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, task, tmp_path_factory):
    """The tiny model fitted to the task's reference q (default steps), and the fit's metrics."""
    out = tmp_path_factory.mktemp("reference")
    metrics = fit_reference(tiny_model_dir, task, out, seed=0)
    return out, metrics


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def brute_force_logprobs(model, tokenizer, task) -> torch.Tensor:
    """log π(y|x) one candidate at a time: model(...).logits on the concatenated ids, in float64."""
    logps = torch.zeros(task.num_prompts, task.num_candidates, dtype=torch.float64)
    for p, prompt in enumerate(task.prompts):
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for k, candidate in enumerate(task.candidates[p]):
            response_ids = tokenizer(candidate + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + response_ids])
            with torch.no_grad():
                logits = model(ids).logits[0].double()  # [T, V]
            token_logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
            logps[p, k] = token_logps[-len(response_ids) :].sum()
    return logps


def test_candidates_are_the_templated_prompt_followed_by_content_and_end_of_turn(tiny_model_dir, task):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = encode_candidates(tokenizer, task)
    assert batch.input_ids.shape[0] == task.num_prompts * task.num_candidates
    row = 1 * task.num_candidates + 2  # prompt 1, candidate 2
    ids = batch.input_ids[row][batch.attention_mask[row].bool()]
    expected = f"<|im_start|>user\n{task.prompts[1]}<|im_end|>\n<|im_start|>assistant\n{task.candidates[1][2]}<|im_end|>"
    assert tokenizer.decode(ids) == expected
    response_ids = batch.input_ids[row][batch.response_mask[row]]
    assert tokenizer.decode(response_ids) == task.candidates[1][2] + "<|im_end|>"


def test_response_distribution_equals_brute_force_teacher_forcing(tiny_model_dir, fitted, task):
    for model_dir, tolerance in ((fitted[0], 1e-5), (tiny_model_dir, 1e-4)):
        model, tokenizer = load(model_dir)
        expected = brute_force_logprobs(model, tokenizer, task)
        # log-probs of the untrained model are about -60, so float32 sums get a looser absolute tolerance
        torch.testing.assert_close(
            response_logprobs(model, tokenizer, task), expected, atol=tolerance, rtol=0
        )
        probs = response_distribution(model, tokenizer, task, chunk_size=7)  # uneven chunks, same answer
        torch.testing.assert_close(probs, expected.exp(), atol=1e-5, rtol=0)


def test_fitting_the_reference_matches_q_on_s_with_almost_all_mass_on_s(fitted, task):
    model_dir, metrics = fitted
    assert metrics["tv_to_reference"] < 0.03 and metrics["mass_on_s"] > 0.9, metrics
    model, tokenizer = load(model_dir)  # saved as a Hugging Face folder
    report = evaluate_expert(model, tokenizer, task, alpha=1.0, beta=0.1, reference=task.reference_tensor())
    assert report["mass_on_s"] == pytest.approx(metrics["mass_on_s"], abs=1e-6)
    assert report["kl_to_reference_on_s"] < 0.01
    assert report["tv_to_target"] > 0.5  # q is far from softmax(r/α): there is work for SPO to do


def test_tabular_distribution_equal_to_target_scores_zero_tv(task):
    target = task.target_distribution(2.0)
    metrics = expert_metrics(target, task, alpha=2.0)
    assert metrics["tv_to_target"] == pytest.approx(0, abs=1e-12)
    assert metrics["per_prompt_tv"] == pytest.approx([0] * 8, abs=1e-12)
    assert metrics["mass_on_s"] == pytest.approx(1)
    assert metrics["entropy"] == pytest.approx(metrics["target_entropy"])
    assert metrics["expected_reward"] == pytest.approx(metrics["target_expected_reward"])
    assert "tv_to_dpo_optimum" not in metrics and "kl_to_reference_on_s" not in metrics


def test_metrics_renormalize_on_s_and_report_the_mass_separately(task):
    target = task.target_distribution(1.0)
    metrics = expert_metrics(0.5 * target, task, alpha=1.0)
    assert metrics["tv_to_target"] == pytest.approx(0, abs=1e-12) and metrics["mass_on_s"] == pytest.approx(
        0.5
    )


def test_metrics_measure_distance_to_dpo_optimum_and_kl_to_reference(task):
    q = task.reference_tensor()
    dpo = task.dpo_optimum(0.1)
    metrics = expert_metrics(dpo, task, alpha=1.0, beta=0.1, reference=q)
    assert metrics["tv_to_dpo_optimum"] == pytest.approx(0, abs=1e-12)
    assert metrics["tv_to_target"] == pytest.approx(
        total_variation(dpo, task.target_distribution(1.0)).mean().item()
    )
    assert metrics["kl_to_reference_on_s"] == pytest.approx(kl_divergence(dpo, q).mean().item())
    assert expert_metrics(q, task, alpha=1.0, reference=q)["kl_to_reference_on_s"] == pytest.approx(
        0, abs=1e-12
    )


def test_entropy_total_variation_and_kl_helpers_on_known_cases():
    uniform = torch.full((5,), 0.2, dtype=torch.float64)
    one_hot = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)
    assert entropy(uniform).item() == pytest.approx(math.log(5))
    assert entropy(one_hot).item() == 0
    assert total_variation(one_hot, torch.tensor([0, 1.0, 0, 0, 0])).item() == 1
    assert kl_divergence(one_hot, uniform).item() == pytest.approx(math.log(5))


def test_plots_are_written_as_valid_pngs(task, tmp_path):
    target, q = task.target_distribution(1.0), task.reference_tensor()
    learned = {"SPO": 0.9 * target + 0.1 * q, "DPO": task.dpo_optimum(0.1)}
    path = plot_expert_distributions(
        learned, target, q, tmp_path / "expert.png", "learned vs softmax(r/α)", task.prompts, task.candidates
    )
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    rows = [{"step": step, "loss": 1 / (step + 1), "kl": 0.01 * step} for step in range(20)]
    curves = plot_curves({"spo": rows, "dpo": rows[:10]}, ["loss", "kl", "missing"], tmp_path / "curves.png")
    assert matplotlib.image.imread(curves).ndim == 3
    single = plot_expert_distributions(target, target, None, tmp_path / "single.png", "target only")
    assert matplotlib.image.imread(single).shape[2] in (3, 4)
