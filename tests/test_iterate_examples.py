"""Round examples from judged candidates: labels follow the judge, failures are counted, rows load."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from spo_ray.data import collate_preference_batch, normalize_row
from spo_ray.data.schema import RowProblem
from spo_ray.iterative import JudgedPrompt, build_examples
from spo_ray.judges import Judgement

PROMPT = [{"role": "user", "content": "Name a color."}]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _scored(responses: list[str], scores: list[float]) -> JudgedPrompt:
    return JudgedPrompt(PROMPT, responses, Judgement(scores=scores))


def test_sampled_pair_labels_follow_the_bradley_terry_probability():
    item = _scored(["Red.", "Blue."], [1.0, 0.0])
    rows, skipped = build_examples([item] * 20000, "pairs", "sampled", random.Random(0))
    red_wins = sum(row["chosen"] == "Red." for row in rows) / len(rows)
    assert len(rows) == 20000 and not skipped
    assert red_wins == pytest.approx(_sigmoid(1.0), abs=0.01)  # 0.731; binomial sd 0.003


def test_argmax_pairs_pick_the_judges_preferred_response_and_skip_ties():
    item = _scored(["Red.", "Blue.", "Green."], [0.5, 2.0, 0.5])
    rows, skipped = build_examples([item], "pairs", "argmax", random.Random(0))
    assert rows == [
        {"prompt": PROMPT, "chosen": "Blue.", "rejected": "Red."},
        {"prompt": PROMPT, "chosen": "Blue.", "rejected": "Green."},
    ]
    assert skipped == {"tie": 1}


def test_repeated_samples_empty_responses_and_missing_verdicts_are_counted_not_labelled():
    pairwise = [[0.5, None, 0.9, 0.9], [None, 0.5, 0.5, 0.9], [0.1, 0.5, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5]]
    item = JudgedPrompt(PROMPT, ["Red.", "Blue.", "Red.", " "], Judgement(pairwise=pairwise))
    rows, skipped = build_examples([item], "pairs", "sampled", random.Random(0))
    # pairs (0,1): no verdict; (0,2) and (1,2)... (0,2) identical; (1,2) judged; (x,3): empty
    assert skipped == {"no_verdict": 1, "identical_pair": 1, "empty_response": 3}
    assert len(rows) == 1 and {rows[0]["chosen"], rows[0]["rejected"]} == {"Blue.", "Red."}


def test_sampled_best_of_n_winners_are_softmax_of_utilities():
    utilities = [0.0, 1.0, 2.0]
    item = _scored(["Red.", "Blue.", "Green."], utilities)
    rows, _ = build_examples([item] * 30000, "best_of_n", "sampled", random.Random(1))
    wins = {"Red.": 0, "Blue.": 0, "Green.": 0}
    for row in rows:
        wins[row["responses"][row["ranking"][0]]] += 1
    expected = np.exp(utilities) / np.exp(utilities).sum()
    observed = np.array([wins["Red."], wins["Blue."], wins["Green."]]) / len(rows)
    np.testing.assert_allclose(observed, expected, atol=0.01)


def test_ranked_rows_use_one_group_size_and_argmax_orders_by_utility():
    big = _scored(["Red.", "Blue.", "Green.", "Blue."], [0.0, 3.0, 1.0, 3.0])  # 3 distinct texts
    small = _scored(["Tea.", "Milk.", "Tea."], [2.0, -1.0, 2.0])  # 2 distinct texts
    single = _scored(["Soda.", "Soda."], [0.0, 0.0])  # 1 distinct text: no row
    rows, skipped = build_examples([big, small, single], "ranked", "argmax", random.Random(0))
    assert skipped == {"fewer_than_2_distinct": 1}
    assert [len(row["responses"]) for row in rows] == [2, 2]  # the fewest distinct texts of a prompt
    for row in rows:
        ranked = [row["responses"][k] for k in row["ranking"]]
        scores = {"Red.": 0.0, "Blue.": 3.0, "Green.": 1.0, "Tea.": 2.0, "Milk.": -1.0}
        assert [scores[t] for t in ranked] == sorted((scores[t] for t in ranked), reverse=True)
        assert sorted(row["ranking"]) == [0, 1]


def test_sppo_rows_keep_repeats_and_carry_the_mean_pairwise_win_probability():
    scores = [1.0, 0.0, 1.0, -1.0]
    item = _scored(["Red.", "Blue.", "Red.", "Black."], scores)
    rows, skipped = build_examples([item], "sppo", "sampled", random.Random(0))
    assert not skipped and rows[0]["responses"] == ["Red.", "Blue.", "Red.", "Black."]
    for i, p in enumerate(rows[0]["win_probs"]):
        expected = np.mean([_sigmoid(scores[i] - scores[j]) for j in range(4) if j != i])
        assert p == pytest.approx(expected, abs=1e-12)
    example = normalize_row(rows[0])
    assert example.win_probs == rows[0]["win_probs"] and example.responses[0] == example.responses[2]


def test_sppo_rows_with_a_missing_verdict_are_dropped_and_counted():
    pairwise = [[0.5, None], [None, 0.5]]
    item = JudgedPrompt(PROMPT, ["Red.", "Blue."], Judgement(pairwise=pairwise))
    rows, skipped = build_examples([item], "sppo", "sampled", random.Random(0))
    assert rows == [] and skipped == {"no_verdict_row": 1}


@pytest.mark.parametrize(
    ("win_probs", "reason"),
    [([0.5, 1.5], "wrong_type"), ([0.5], "wrong_count"), (["high", 0.2], "wrong_type")],
)
def test_bad_win_probs_are_rejected_with_the_field_named(win_probs, reason):
    with pytest.raises(RowProblem) as problem:
        normalize_row({"prompt": "Name a color.", "responses": ["Red.", "Blue."], "win_probs": win_probs})
    assert problem.value.field == "win_probs" and problem.value.reason == reason


def test_collated_batches_carry_win_probabilities_per_response():
    rows = {
        "prompt_ids": np.array([[1, 2], [3, 4]], dtype=object),
        "response_ids": np.array([[[5, 6], [7]], [[8], [9, 10]]], dtype=object),
        "ranking": np.array([[0, 1], [0, 1]]),
        "example_id": np.array([0, 1]),
        "win_prob": np.array([[0.25, 0.75], [0.5, 0.5]]),
    }
    batch = collate_preference_batch(rows, pad_token_id=0)
    assert batch.win_prob.tolist() == [[0.25, 0.75], [0.5, 0.5]]
    assert batch.prev_logps is None


def test_iterate_refuses_rows_that_do_not_fit_the_loss_before_starting_anything(tmp_path, capsys):
    from spo_ray.cli import main

    code = main(
        [
            "iterate",
            "--set",
            "loss.name=dpo",
            "--set",
            "iterate.examples=best_of_n",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "iterate.examples" in err and "set iterate.examples=pairs" in err
    assert list(tmp_path.iterdir()) == []  # nothing was written, no Ray runtime was started


def test_sppo_refuses_replayed_rows_whose_win_probabilities_belong_to_an_earlier_policy(tmp_path, capsys):
    from spo_ray.cli import main

    code = main(
        [
            "iterate",
            "--set",
            "loss.name=sppo",
            "--set",
            "iterate.replay_rounds=1",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 2 and "iterate.replay_rounds" in capsys.readouterr().err
