"""bench_online_real.py compares like with like: TRL's trainers get the arithmetic task's exact judge as their
reward function, and the comparison runs end to end (TRL GRPO on the tiny model, the shared evaluator, the
RESULTS.md section and the headline keys). spo_ray's own rounds on the task: tests/test_arithmetic_task.py."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture(autouse=True)
def environment_restored():
    """Importing TRL sets VLLM_LOGGING_LEVEL=ERROR in os.environ (trl/_compat.py) and its trainers set
    MASTER_ADDR/PORT; later tests' subprocesses would inherit them. Each test here leaves the environment as it
    found it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


PROBLEM = (
    "Leo has 20 coins. Then Leo gives away 6. How many coins does Leo have now? Answer with just the number."
)


def test_the_trl_reward_function_returns_the_judges_exact_scores():
    from online_real_runs import ArithmeticReward

    reward = ArithmeticReward()
    completions = ["14", "Leo has 14 coins.", "20 - 6 = 14", "26", "fourteen", "", "14 coins, no: 13", "-14"]
    expected = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert reward([PROBLEM] * 8, completions) == expected  # standard (text) format
    conversational = [[{"role": "user", "content": PROBLEM}]] * 8
    replies = [[{"role": "assistant", "content": c}] for c in completions]
    ids = [[1] * (i + 1) for i in range(8)]
    assert reward(conversational, replies, completion_ids=ids) == expected
    assert reward.tokens == sum(range(1, 9)) and reward.samples == 16


def test_grpo_run_evaluation_and_report_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    pytest.importorskip("trl", reason="TRL is the benchmark's comparison target: pip install -e '.[bench]'")
    import torch
    from online_real_report import make_plot, results_keys, section
    from online_real_runs import BUDGET, evaluate_model, trl_grpo_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    budget = {
        **BUDGET,
        "rounds": 1,
        "prompts_per_round": 2,
        "candidates": 2,
        "steps_per_round": 1,
        "max_tokens": 8,
    }
    run = trl_grpo_run({}, tmp_path / "grpo", str(tiny_model_dir), budget, time.perf_counter(), seed=1)
    final = run["points"][-1]
    assert final["steps"] == 1 and final["samples"] == 4 and 4 <= final["tokens"] <= 4 * 8
    spec = {
        "prompts": 3,
        "samples": 2,
        "kl_samples": 3,
        "temperature": 0.7,
        "max_tokens": 8,
        "seed": 0,
        "backend": "hf",
    }
    start = evaluate_model(str(tiny_model_dir), str(tiny_model_dir), spec=spec)
    after = evaluate_model(final["model"], str(tiny_model_dir), spec=spec)
    assert start["kl_to_start"] == 0.0 and after["kl_to_start"] >= 0  # the tiny model never scores: no update
    assert len(after["per_prompt_accuracy"]) == 3 and 1 <= after["distinct_answers_per_prompt"] <= 2
    moved = tmp_path / "moved"  # the KL estimate sees a policy that differs from the start
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    model.save_pretrained(moved)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(moved)
    assert evaluate_model(str(moved), str(tiny_model_dir), spec=spec)["kl_to_start"] > 0.01
    run.update(budget=budget, peak_rss_gib={"driver": 1.0, "total": 1.0})
    run["points"][0]["eval"], final["eval"] = start, after
    runs = {"spo_a2": json.loads(json.dumps(run)), "trl_grpo": run}
    data = {"start": start, "seeds": {"0": runs, "1": json.loads(json.dumps(runs))}}
    keys = results_keys(data)
    assert keys["online_wall_ratio_vs_trl_grpo"] == 1.0  # the same run twice
    assert keys["online_real"]["seeds"] == 2
    assert keys["online_real"]["runs"]["trl_grpo"]["generated_samples"] == 4
    lines = section(data, make_plot(data, tmp_path / "plot.png").name)
    assert (
        lines[0] == "## Online on a real model (issue 16)"
        and sum(line.startswith("| TRL") for line in lines) == 1
    )
    assert "scored" not in lines[2]


def test_seed_figures_are_means_and_the_interval_spans_prompts_and_seeds():
    from online_real_report import hierarchical_ci, results_keys

    def run(wall: float, before: list[float], after: list[float]) -> dict:
        evaluation = lambda acc: {"accuracy": sum(acc) / len(acc), "per_prompt_accuracy": acc}  # noqa: E731
        points = [
            {"eval": evaluation(before)},
            {"eval": evaluation(after), "samples": 8, "tokens": 80, "steps": 2},
        ]
        points[-1]["eval"].update(distinct_answers_per_prompt=1.0, kl_to_start=0.1)
        return {"points": points, "wall_seconds": wall, "budget": {}, "cpu_seconds": wall}

    before = [0.5] * 4
    seeds = {  # seed 0 gains 0.5 on every prompt, seed 1 loses 0.25 on every prompt
        "0": {"spo_a1": run(100.0, before, [1.0] * 4), "trl_grpo": run(50.0, before, before)},
        "1": {"spo_a1": run(300.0, before, [0.25] * 4), "trl_grpo": run(70.0, before, before)},
    }
    keys = results_keys({"seeds": seeds})
    record = keys["online_real"]["runs"]["spo_a1"]
    assert record["gain_per_seed"] == [0.5, -0.25] and record["gain"] == 0.125
    assert keys["online_wall_ratio_vs_trl_grpo"] == 0.3  # mean 60 s / mean 200 s
    assert record["gain_ci95"] == [-0.25, 0.5]  # resampling the seeds reaches either seed's gain alone
    assert hierarchical_ci([[0.1, 0.1], [0.1, 0.1]]) == [0.1, 0.1]  # no spread, no width
    # the start scored twice more: gains are against the per-prompt mean of its three evaluations
    spread = {"7": {"accuracy": 0.25, "per_prompt_accuracy": [0.0, 0.5, 0.0, 0.5]}}
    spread["8"] = {"accuracy": 0.25, "per_prompt_accuracy": [0.0, 0.0, 0.5, 0.5]}
    start = {"accuracy": 0.5, "per_prompt_accuracy": before}
    pooled = results_keys({"seeds": seeds, "start": start, "start_spread": spread})["online_real"]["runs"]
    assert pooled["spo_a1"]["accuracy_before"] == pytest.approx(1 / 3)  # (0.5 + 0.25 + 0.25) / 3
    assert pooled["spo_a1"]["gain_per_seed"] == [0.6667, -0.0833]  # 1.0 − 1/3 and 0.25 − 1/3
    assert pooled["trl_grpo"]["gain"] == pytest.approx(0.1667, abs=1e-4)  # it stayed at 0.5
    one_seed = hierarchical_ci([[0.0, 1.0] * 8])  # one seed: the plain bootstrap over prompts
    assert 0.2 < one_seed[0] < 0.5 < one_seed[1] < 0.8
