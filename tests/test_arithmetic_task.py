"""The built-in arithmetic task: its judge is exact on hand-made right and wrong answers, its generator is
seeded with disjoint splits whose answers the judge reads back from the text, and one small round of
`spo-ray iterate` runs on it end to end (real Ray, vLLM and a tiny model)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from spo_ray.config import load_config
from spo_ray.errors import ConfigError
from spo_ray.tasks.arithmetic import ArithmeticTask, final_number, make_problem, score, solve

PROBLEM = (
    "Mia has 12 marbles. Then Mia finds 7 more. Then Mia loses 5. How many marbles does Mia have now? "
    "Answer with just the number."
)


def test_the_judge_is_exact_on_hand_made_answers():
    assert solve(PROBLEM) == 14
    responses = [
        "12 + 7 = 19, and 19 - 5 = 14. The answer is 14",  # right, the last number
        "Mia has 14 marbles now.",  # right, words after the number
        "14",
        "She has 19 marbles.",  # wrong
        "14 marbles? No: 12 + 7 - 5 = 16",  # the last number counts, and it is wrong
        "fourteen",  # no digits: wrong
        "",
        "The answer is -14.",  # sign matters
    ]
    assert score(PROBLEM, responses) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert final_number("I count 1,024 coins.") == 1024 and final_number("none") is None
    with pytest.raises(ValueError, match="not an arithmetic problem"):
        score("What is the capital of France?", ["Paris"])


def test_problems_are_seeded_disjoint_and_read_back_exactly():
    rng = random.Random(1)
    for operations in (1, 2, 4):
        for _ in range(500):
            problem = make_problem(rng, operations)
            assert solve(problem.text) == problem.answer and 0 <= problem.answer <= 99
            assert problem.text.count("Then ") == operations
    task = ArithmeticTask.build(seed=3, num_train=64, num_heldout=16, operations=2)
    again = ArithmeticTask.build(seed=3, num_train=64, num_heldout=16, operations=2)
    assert task.splits == again.splits
    texts = {split: {p.text for p in problems} for split, problems in task.splits.items()}
    assert [len(texts[s]) for s in ("train", "validation", "test")] == [64, 16, 16]
    assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]
    assert ArithmeticTask.build(seed=4, num_train=64, num_heldout=16, operations=2).splits != task.splits


def test_train_on_the_arithmetic_task_says_to_run_rounds(tmp_path):
    from spo_ray.tasks import run_job

    cfg = load_config(None, ["task.name=arithmetic", f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="task.name.*spo-ray iterate"):
        run_job(cfg)


@pytest.mark.slow
def test_one_round_on_the_arithmetic_task_scores_held_out_prompts_with_the_judge(
    ray_runtime, tiny_model_dir, tmp_path
):
    from spo_ray.iterative import run_iterate

    out = tmp_path / "arith"
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "task.name=arithmetic",
            "task.num_prompts=8",
            "task.num_heldout=4",
            "judge.name=task",
            "iterate.rounds=1",
            "iterate.prompts_per_round=4",
            "iterate.candidates_per_prompt=4",
            "iterate.steps_per_round=2",
            "iterate.max_tokens=8",
            "iterate.eval_prompts=4",
            "iterate.eval_samples=2",
            "iterate.labels=sampled",  # the tiny model is never right: ties become coin flips, rows exist
            "loss.kl_coef=0",
            "train.batch_size=2",
            "logging.wandb_mode=disabled",
            "logging.progress=false",
            f"output.dir={out}",
        ],
    )
    summary = run_iterate(cfg)

    test_prompts = [
        json.loads(line)["prompt"] for line in (out / "task" / "test.jsonl").read_text().splitlines()
    ]
    train_prompts = {
        json.loads(line)["prompt"] for line in (out / "task" / "train.jsonl").read_text().splitlines()
    }
    for number, record in enumerate(summary["rounds"]):
        samples = [json.loads(line) for line in Path(record["eval_samples"]).read_text().splitlines()]
        asked = [
            s["prompt"][-1]["content"] if isinstance(s["prompt"], list) else s["prompt"] for s in samples
        ]
        assert asked == test_prompts  # the held-out split, not the training prompts
        scores = [x for s, prompt in zip(samples, asked) for x in score(prompt, s["responses"])]
        assert record["expected_reward"] == pytest.approx(sum(scores) / len(scores)), number
    rows = [
        json.loads(line) for line in (out / "rounds" / "round_1" / "examples.jsonl").read_text().splitlines()
    ]
    assert rows and all(
        (r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"]) in train_prompts
        for r in rows
    )
    assert summary["rounds"][1]["train_steps"] == 2
