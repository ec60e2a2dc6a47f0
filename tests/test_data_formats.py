"""The six preference formats become one canonical example: prompt messages, responses, ranking."""

from __future__ import annotations

import pytest

from spo_ray.data.schema import RowProblem, detect_format, normalize_row

USER_HI = {"role": "user", "content": "Hi"}


def test_explicit_strings_become_a_user_prompt_and_a_chosen_first_pair():
    example = normalize_row({"prompt": "Why?", "chosen": "Because of light.", "rejected": "No idea."})
    assert example.format == "explicit"
    assert example.prompt == [{"role": "user", "content": "Why?"}]
    assert example.responses == ["Because of light.", "No idea."]
    assert example.ranking == [0, 1]


def test_conversational_rows_keep_the_system_prompt_and_take_the_assistant_turns():
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, USER_HI],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    example = normalize_row(row)
    assert example.format == "conversational"
    assert example.prompt == row["prompt"]
    assert example.responses == ["Hello!", "Go away."]


def test_hh_transcripts_split_at_the_last_shared_assistant_turn():
    shared = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    example = normalize_row({"chosen": shared + " 6.", "rejected": shared + " 7, I think."})
    assert example.format == "implicit"
    assert example.prompt == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert example.responses == ["6.", "7, I think."]


def test_hh_transcripts_whose_replies_share_a_first_word_still_split_at_the_turn():
    shared = "\n\nHuman: Name a color.\n\nAssistant:"
    example = normalize_row({"chosen": shared + " Blue is nice.", "rejected": shared + " Blue."})
    assert example.responses == ["Blue is nice.", "Blue."]
    assert example.prompt == [{"role": "user", "content": "Name a color."}]


def test_sharegpt_multi_turn_with_system_maps_roles_to_messages():
    row = {
        "conversations": [
            {"from": "system", "value": "You are kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "A joke?"},
        ],
        "chosen": {"from": "gpt", "value": "Knock knock."},
        "rejected": {"from": "gpt", "value": "No."},
    }
    example = normalize_row(row)
    assert example.format == "sharegpt"
    assert [m["role"] for m in example.prompt] == ["system", "user", "assistant", "user"]
    assert example.prompt[0]["content"] == "You are kind." and example.prompt[-1]["content"] == "A joke?"
    assert example.responses == ["Knock knock.", "No."]


def test_binarized_rows_take_the_user_turn_from_chosen_and_keep_scores():
    row = {
        "prompt": "Name a fruit",
        "chosen": [{"role": "user", "content": "Name a fruit"}, {"role": "assistant", "content": "Apple"}],
        "rejected": [{"role": "user", "content": "Name a fruit"}, {"role": "assistant", "content": "Car"}],
        "score_chosen": 9,
        "score_rejected": 2.5,
    }
    example = normalize_row(row)
    assert example.format == "binarized"
    assert example.prompt == [{"role": "user", "content": "Name a fruit"}]
    assert example.responses == ["Apple", "Car"] and example.scores == [9.0, 2.5]


def test_nary_rows_are_stored_best_first_from_a_ranking_scores_or_a_best_of_n():
    ranked = normalize_row({"prompt": "Pick", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]})
    scored = normalize_row({"prompt": "Pick", "responses": ["a", "b", "c"], "scores": [0.1, 0.9, 0.5]})
    best = normalize_row({"prompt": "Pick", "responses": ["a", "b", "c", "d"], "ranking": [3]})
    top_two = normalize_row({"prompt": "Pick", "responses": ["a", "b", "c", "d"], "ranking": [2, 0]})
    assert ranked.format == scored.format == "nary"
    assert ranked.responses == ["c", "a", "b"] and ranked.ranking == [0, 1, 2]
    assert ranked.response_fields == ["responses[2]", "responses[0]", "responses[1]"]
    assert scored.responses == ["b", "c", "a"] and scored.ranking == [0, 1, 2]
    assert scored.scores == [0.9, 0.5, 0.1]
    assert best.responses == ["d", "a", "b", "c"] and best.ranking == [0]
    assert top_two.responses == ["c", "a", "b", "d"] and top_two.ranking == [0, 1]
    # the top n-1 fix the last place too: a full ranking
    assert normalize_row({"prompt": "P", "responses": ["a", "b", "c"], "ranking": [1, 2]}).ranking == [
        0,
        1,
        2,
    ]


def test_a_pairwise_row_listing_the_better_response_second_puts_it_first():
    for row in (
        {"prompt": "Hi", "responses": ["Bye", "Hello"], "scores": [0.1, 0.9]},
        {"prompt": "Hi", "responses": ["Bye", "Hello"], "ranking": [1, 0]},
        {"prompt": "Hi", "responses": ["Bye", "Hello"], "ranking": [1]},
    ):
        example = normalize_row(row)
        assert example.responses == ["Hello", "Bye"], row  # column 0: the chosen response of every loss
    explicit = normalize_row({"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"})
    assert (explicit.prompt, explicit.responses) == (example.prompt, example.responses)


def test_tied_scores_rank_only_the_responses_before_the_tie():
    partial = normalize_row(
        {"prompt": "P", "responses": ["a", "b", "c", "d"], "scores": [0.2, 0.9, 0.2, 0.5]}
    )
    assert partial.responses[:2] == ["b", "d"] and partial.ranking == [0, 1]  # a and c tie for last
    with pytest.raises(RowProblem) as info:
        normalize_row({"prompt": "P", "responses": ["a", "b", "c"], "scores": [0.9, 0.9, 0.1]})
    assert (info.value.field, info.value.reason) == ("scores", "no_preference")


def test_sppo_rows_carry_win_probabilities_and_no_ranking():
    row = {"prompt": "P", "responses": ["a", "a", "b"], "win_probs": [0.25, 0.25, 1.0]}
    example = normalize_row(row)
    assert (
        example.responses == ["a", "a", "b"]
        and example.ranking == []
        and example.win_probs == [0.25, 0.25, 1.0]
    )


def test_format_override_reads_rows_strictly_in_that_format():
    row = {"prompt": "Why?", "chosen": "Yes.", "rejected": "No."}
    assert detect_format(row) == "explicit"
    with pytest.raises(RowProblem) as info:
        normalize_row(row, "sharegpt")
    assert info.value.field == "conversations" and info.value.reason == "missing_field"
