"""Every bad row is reported as file:line: field: reason, and the bad-row policy stops or quarantines."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spo_ray.config import DataConfig
from spo_ray.data import prepare_preference_data, validate_paths
from spo_ray.errors import DataError

GOOD = {"prompt": "Why is the sky blue?", "chosen": "Light scatters.", "rejected": "It is paint."}
LONG = " ".join(["word"] * 400)

# (line in the file, raw line, field, reason); line 1 is a good row
CASES = [
    (2, b"{not json", "<row>", "invalid_json"),
    (3, json.dumps({"prompt": "Hi", "chosen": "Hello"}).encode(), "rejected", "missing_field"),
    (4, json.dumps({"prompt": "Hi", "chosen": 7, "rejected": "Bye"}).encode(), "chosen", "wrong_type"),
    (5, json.dumps({"prompt": "  ", "chosen": "a", "rejected": "b"}).encode(), "prompt", "empty"),
    (6, json.dumps({"prompt": "Hi", "chosen": "", "rejected": "b"}).encode(), "chosen", "empty"),
    (
        7,
        json.dumps({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}).encode(),
        "rejected",
        "identical_responses",
    ),
    (
        8,
        json.dumps(
            {
                "prompt": [{"role": "wizard", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            }
        ).encode(),
        "prompt[0].role",
        "unknown_role",
    ),
    (
        9,
        json.dumps({"prompt": "Hi", "responses": ["a", "b"], "ranking": [0, 0]}).encode(),
        "ranking",
        "bad_ranking",
    ),
    (10, json.dumps({"prompt": "Hi", "chosen": LONG, "rejected": "short"}).encode(), "chosen", "too_long"),
    (11, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "<row>", "invalid_utf8"),
]


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "prefs.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode()] + [raw for _, raw, _, _ in CASES]) + b"\n")
    return path


@pytest.mark.parametrize("line,raw,field,reason", CASES, ids=[c[3] + f"_line{c[0]}" for c in CASES])
def test_each_bad_row_is_reported_with_file_line_field_and_reason(
    bad_file, tiny_model_dir, line, raw, field, reason
):
    report = validate_paths(
        [str(bad_file)],
        tokenizer_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        on_long_rows="skip",  # line 10 is a too_long row, not a cut one
    )
    by_line = {p.location: p for p in report.problems}
    problem = by_line[f"{bad_file}:{line}"]
    assert (problem.field, problem.reason) == (field, reason)
    assert str(problem).startswith(f"{bad_file}:{line}: {field}: ")
    assert report.rows_read == 1 + len(CASES) and report.ok == 1


def test_rows_of_json_lists_and_parquet_are_reported_by_row_index(tmp_path):
    listed = tmp_path / "prefs.json"
    listed.write_text(json.dumps([GOOD, {"prompt": "Hi", "chosen": "x"}]))
    table = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "rejected": GOOD["chosen"]}]), table)
    report = validate_paths([str(listed), str(table)])
    assert [str(p).split(": ")[0:2] for p in report.problems] == [
        [f"{listed}:row 1", "rejected"],
        [f"{table}:row 1", "rejected"],
    ]
    assert dict(report.bad) == {"missing_field": 1, "identical_responses": 1}


def test_error_policy_stops_at_the_first_bad_row_with_its_location(
    bad_file, tiny_model_dir, tmp_path, ray_runtime
):
    cfg = DataConfig(train_files=[str(bad_file)], max_length=64, max_prompt_length=32, on_long_rows="skip")
    with pytest.raises(DataError) as info:
        prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path))
    assert str(info.value).startswith(f"{bad_file}:2: <row>: invalid JSON")
    assert "data.on_bad_rows=skip" in str(info.value)


def test_skip_policy_quarantines_bad_rows_with_reasons_and_counts_them(
    bad_file, tiny_model_dir, tmp_path, ray_runtime
):
    cfg = DataConfig(
        train_files=[str(bad_file)],
        max_length=64,
        max_prompt_length=32,
        on_bad_rows="skip",
        on_long_rows="skip",
    )
    prepared = prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path))
    assert prepared.num_train == 1 and prepared.rows_read == 1 + len(CASES)
    expected = {}
    for _, _, _, reason in CASES:
        expected[reason] = expected.get(reason, 0) + 1
    assert prepared.bad_rows == expected
    assert prepared.quarantine_path == str(tmp_path / "quarantine.jsonl")
    records = [
        json.loads(line) for line in Path(prepared.quarantine_path).read_text(encoding="utf-8").splitlines()
    ]
    assert [(r["line"], r["field"], r["reason"]) for r in records] == [(c[0], c[2], c[3]) for c in CASES]
    assert records[0]["data"] == "{not json" and records[2]["data"] == {
        "prompt": "Hi",
        "chosen": 7,
        "rejected": "Bye",
    }
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["bad_rows"] == expected and summary["num_train"] == 1
