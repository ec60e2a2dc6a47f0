"""The synthetic expert task: Bradley–Terry preference data, targets that tell SPO from DPO, and its judge."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest
import torch

from spo_ray.eval.distributions import entropy, total_variation
from spo_ray.tasks.synthetic_expert.data import write_synthetic_expert_data
from spo_ray.tasks.synthetic_expert.evaluate import empirical_optimum
from spo_ray.tasks.synthetic_expert.task import OUTSIDE_SCORE, SyntheticExpertTask


@pytest.fixture(scope="module")
def task() -> SyntheticExpertTask:
    return SyntheticExpertTask.build(seed=0)


def test_default_task_has_eight_prompts_with_five_distinct_short_candidates(task):
    assert task.num_prompts == 8 and task.num_candidates == 5
    assert len(set(task.prompts)) == 8
    for row in task.candidates:
        assert len(set(row)) == 5 and all(1 <= len(answer.split()) <= 3 for answer in row)
    torch.testing.assert_close(task.reference_tensor().sum(-1), torch.ones(8, dtype=torch.float64))


def test_build_is_deterministic_for_a_seed_and_differs_across_seeds(task):
    assert SyntheticExpertTask.build(seed=0) == task
    assert SyntheticExpertTask.build(seed=1).rewards != task.rewards


def test_bradley_terry_sampler_win_rates_match_sigmoid_of_reward_gap(task):
    rows = task.sample_pairs(24_000, rng_seed=0)
    wins, totals = Counter(), Counter()
    for row in rows:
        x = task.prompts.index(row["prompt"])
        chosen = task.candidate_index(row["prompt"], row["chosen"])
        rejected = task.candidate_index(row["prompt"], row["rejected"])
        low, high = sorted((chosen, rejected))
        totals[x, low, high] += 1
        wins[x, low, high] += chosen == low
    pairs = [(x, a, b) for x in range(8) for a, b in itertools.combinations(range(5), 2)]
    assert set(totals) == set(pairs)  # x uniform, every distinct pair drawn
    for x, a, b in pairs:
        n = totals[x, a, b]
        p = 1 / (1 + math.exp(-(task.rewards[x][a] - task.rewards[x][b])))
        tolerance = 4.5 * math.sqrt(p * (1 - p) / n)  # 4.5 binomial standard errors, 80 pairs
        assert abs(wins[x, a, b] / n - p) < tolerance, (x, a, b, wins[x, a, b], n, p)


def test_sampled_rows_are_explicit_preferences_between_distinct_candidates(task):
    rows = task.sample_pairs(200, rng_seed=3)
    assert rows == task.sample_pairs(200, rng_seed=3) and rows != task.sample_pairs(200, rng_seed=4)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] != row["rejected"]
        assert row["chosen"] in task.candidates[task.prompts.index(row["prompt"])]


def test_larger_alpha_gives_a_higher_entropy_target(task):
    entropies = [entropy(task.target_distribution(alpha)).mean().item() for alpha in (0.25, 0.5, 1, 2, 4)]
    assert all(low < high for low, high in zip(entropies, entropies[1:]))
    assert entropies[-1] < math.log(5)


def test_reference_is_non_uniform_and_dpo_optimum_differs_from_the_spo_target(task):
    uniform = torch.full((8, 5), 0.2, dtype=torch.float64)
    assert total_variation(task.reference_tensor(), uniform).min() > 0.15
    target = task.target_distribution(1.0)
    # Measured on the default task: TV 0.455 at β=0.1, 0.265 at β=1 (q is anti-aligned with r).
    assert total_variation(task.dpo_optimum(0.1), target).mean() > 0.4
    assert total_variation(task.dpo_optimum(1.0), target).mean() > 0.2
    # With a uniform reference, DPO at β = α would coincide with SPO: the gap comes from q.
    torch.testing.assert_close(task.dpo_optimum(1.0, reference=uniform), target)


def test_empirical_optimum_of_finite_data_approaches_the_target(task):
    target = task.target_distribution(1.0)
    few = total_variation(empirical_optimum(task, task.sample_pairs(500, 0), 1.0), target).mean()
    many = total_variation(empirical_optimum(task, task.sample_pairs(16_000, 0), 1.0), target).mean()
    assert many < 0.04 and many < few


def test_task_round_trips_through_json(task, tmp_path):
    assert SyntheticExpertTask.from_dict(json.loads(json.dumps(task.to_dict()))) == task
    assert SyntheticExpertTask.load(task.save(tmp_path / "task.json")) == task


def test_judge_scores_candidates_by_reward_and_outside_responses_low(task):
    prompt, candidates = task.prompts[0], task.candidates[0]
    assert task.score(prompt, candidates) == task.rewards[0]
    assert task.score(prompt, [f" {candidates[1]}<|im_end|>"]) == [task.rewards[0][1]]
    assert task.score(prompt, ["Something else entirely."]) == [OUTSIDE_SCORE]
    assert min(min(row) for row in task.rewards) - 5 > OUTSIDE_SCORE
    a, b = candidates[0], candidates[1]
    expected = 1 / (1 + math.exp(-(task.rewards[0][0] - task.rewards[0][1])))
    assert task.preference_probability(prompt, a, b) == pytest.approx(expected)
    assert task.preference_probability(prompt, a, b) + task.preference_probability(
        prompt, b, a
    ) == pytest.approx(1)


def test_judge_error_names_an_unknown_prompt(task):
    with pytest.raises(KeyError, match="Tell me a joke"):
        task.score("Tell me a joke.", ["No."])


def test_write_synthetic_expert_data_writes_task_preferences_and_prompts(task, tmp_path):
    paths = write_synthetic_expert_data(tmp_path / "data", task, num_pairs=50, seed=1)
    assert SyntheticExpertTask.load(paths["task"]) == task
    preferences = [json.loads(line) for line in paths["preferences"].read_text().splitlines()]
    assert preferences == task.sample_pairs(50, rng_seed=1)
    prompts = [json.loads(line) for line in paths["prompts"].read_text().splitlines()]
    assert prompts == [{"prompt": prompt} for prompt in task.prompts]
