"""`spo-ray data validate` exits 0 on clean data and 2 with the problems; `data inspect` shows examples."""

from __future__ import annotations

import json

from spo_ray.cli import main

GOOD = [{"prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]


def test_validate_exits_0_and_prints_counts_when_every_row_is_good(tmp_path, capsys):
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    assert main(["data", "validate", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["rows read: 3", "ok: 3", "bad: 0"]
    assert lines[3].startswith("lengths: not checked (no --tokenizer)") and len(lines) == 4


def test_validate_with_a_tokenizer_reports_what_max_length_would_cut_or_refuse(
    tmp_path, tiny_model_dir, capsys
):
    path = tmp_path / "long.jsonl"
    long_row = {"prompt": "question?", "chosen": "yes", "rejected": " ".join(["word"] * 100)}
    path.write_text("".join(json.dumps(r) + "\n" for r in [*GOOD, long_row]))
    lengths = ["--tokenizer", str(tiny_model_dir), "--max-length", "48", "--max-prompt-length", "24"]
    assert main(["data", "validate", str(path), *lengths]) == 0
    out = capsys.readouterr().out
    assert "rows with responses cut to --max-length: 1" in out and "not checked" not in out
    assert main(["data", "validate", str(path), *lengths, "--on-long-rows", "skip"]) == 2
    out = capsys.readouterr().out
    assert "  too_long: 1" in out and f"{path}:4: rejected: too long for data.max_length" in out


def test_validate_exits_2_listing_the_first_20_problems_as_file_line_field_reason(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    bad = [{"prompt": "Hi", "chosen": "same", "rejected": "same"}] * 25
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD + bad) + "{oops\n")
    assert main(["data", "validate", str(path), "--format", "explicit"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [
        "rows read: 29",
        "ok: 3",
        "bad: 26",
        "  identical_responses: 25",
        "  invalid_json: 1",
    ]
    assert lines[6] == "first 20 problems:"
    assert lines[7] == f"  {path}:4: rejected: chosen identical to rejected: the same text as chosen"
    assert len(lines) == 27 and lines[-1].startswith(f"  {path}:23: rejected:")


def test_validate_with_a_dimension_counts_other_dimensions_and_names_unlabelled_rows(tmp_path, capsys):
    """`--dimension` selects rows as data.dimension does (Sequential PO stages): other dimensions' rows are
    counted, not bad; a row without a usable label is bad, named file:line."""
    rows = [
        {**GOOD[0], "dimension": "helpful"},
        {**GOOD[1], "dimension": "harmless"},
        {**GOOD[2], "dimensions": ["helpful", "harmless"]},
        {**GOOD[0], "dimensions": []},
    ]
    path = tmp_path / "dims.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "validate", str(path), "--dimension", "helpful"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [
        "rows read: 4",
        "ok: 2",
        "bad: 1",
        "  bad_dimension: 1",
        "rows of other dimensions (left out by --dimension helpful): 1",
    ]
    assert any(line.startswith(f"  {path}:4: dimensions: ") for line in lines)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert main(["data", "validate", str(path), "--dimension", "harmless"]) == 0
    assert "rows of other dimensions (left out by --dimension harmless): 1" in capsys.readouterr().out


def test_validate_names_a_missing_path_and_exits_2(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "nope.jsonl")]) == 2
    assert "PATH[0]: " in capsys.readouterr().err


def test_inspect_shows_normalized_examples_and_with_a_tokenizer_the_templated_text(
    tmp_path, tiny_model_dir, capsys
):
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    assert main(["data", "inspect", str(path), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("== ") == 2 and f'== {path}:1 (format explicit)\nprompt:\n  user: "question 0?"\n' in out
    assert 'response 0 (chosen, rank 1): "yes 0"' in out and 'response 1 (rejected, rank 2): "no 0"' in out
    assert main(["data", "inspect", str(path), "--n", "1", "--tokenizer", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\nquestion 0?<|im_end|>\n<|im_start|>assistant\n" in out
    assert "-- templated response 0 (5 tokens, all scored):\nyes 0<|im_end|>\n" in out
