"""Every input file is read or named: CSV files, empty files, files a folder holds but cannot read, skipped rows."""

from __future__ import annotations

import json

import pytest

from spo_ray.cli import main
from spo_ray.config import DataConfig
from spo_ray.data import prepare_preference_data, validate_paths


def pair(i: int) -> dict:
    return {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# line 1 the header; line 3 a record whose quoted prompt spans lines 3-4; line 6 has an extra field;
# line 7 misses its rejected column (an empty value); line 8 a blank line; line 9 is good.
CSV_TEXT = (
    "prompt,chosen,rejected\n"
    "question 1?,good answer 1,bad answer 1\n"
    '"a prompt over\ntwo lines",good answer 2,bad answer 2\n'
    "question 3?,good answer 3,bad answer 3\n"
    "question 4?,good answer 4,bad answer 4,extra\n"
    "question 5?,good answer 5,\n"
    "\n"
    "question 6?,good answer 6,bad answer 6\n"
)


def test_csv_rows_are_read_by_their_header_and_bad_rows_name_their_real_line(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text(CSV_TEXT)
    report = validate_paths([str(path)])
    assert report.rows_read == 6 and report.ok == 4
    problems = {p.location: (p.field, p.reason) for p in report.problems}
    assert problems == {f"{path}:6": ("<row>", "invalid_csv"), f"{path}:7": ("rejected", "empty")}
    assert "4 fields, but the header (line 1) names 3 columns" in str(report.problems[0])


def test_a_csv_file_trains_like_the_same_rows_in_jsonl(ray_runtime, tmp_path, tiny_model_dir):
    rows = [pair(i) for i in range(6)]
    csv_path = tmp_path / "prefs.csv"
    csv_path.write_text(
        "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
    )
    jsonl = write_jsonl(tmp_path / "prefs.jsonl", rows)
    from_csv = prepare_preference_data(
        DataConfig(train_files=[str(csv_path)]), tiny_model_dir, str(tmp_path / "a")
    )
    from_jsonl = prepare_preference_data(DataConfig(train_files=[jsonl]), tiny_model_dir, str(tmp_path / "b"))

    def ids(prepared):
        rows = prepared.train.take_all()
        return sorted(
            json.dumps([r["prompt_ids"], r["response_ids"]], default=lambda a: a.tolist()) for r in rows
        )

    assert from_csv.num_train == 6 and ids(from_csv) == ids(from_jsonl)


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "whitespace_only"])
def test_an_empty_data_file_stops_training_with_exit_2_naming_the_file(
    ray_runtime, tmp_path, tiny_model_dir, capsys, content
):
    path = tmp_path / "prefs.jsonl"
    path.write_text(content)
    code = main(
        [
            "train",
            "--output-dir",
            str(tmp_path / "out"),
            "--set",
            f"model.path={tiny_model_dir}",
            "--set",
            f"data.train_files=[{path}]",
            "--set",
            "loss.kl_coef=0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "data.train_files" in err, err


def test_validate_names_an_empty_file_and_the_files_a_folder_does_not_read(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [pair(0), pair(1)])
    (folder / "b.jsonl").write_text("\n\n")
    (folder / "notes.txt").write_text("prompt,chosen,rejected\n")
    assert main(["data", "validate", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{folder / 'b.jsonl'}" in out and "no rows" in out
    assert f"{folder / 'notes.txt'}" in out and "not read" in out


def test_a_run_on_a_folder_says_which_rows_it_skipped_and_which_files_it_did_not_read(
    ray_runtime, tmp_path, tiny_model_dir
):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [pair(i) for i in range(6)] + [{"prompt": "q", "chosen": "x"}] * 2)
    (folder / "b.jsonl").write_text("")
    (folder / "notes.txt").write_text("prompt,chosen,rejected\nq,a,b\n")
    cfg = DataConfig(train_files=[str(folder)], on_bad_rows="skip")
    prepared = prepare_preference_data(cfg, tiny_model_dir, str(tmp_path / "out"))
    notes = "\n".join(prepared.notes())
    quarantine = tmp_path / "out" / "quarantine.jsonl"
    assert "skipped 2 of 8 rows (missing_field 2)" in notes and str(quarantine) in notes
    assert len(quarantine.read_text().splitlines()) == 2
    assert str(folder / "b.jsonl") in notes and str(folder / "notes.txt") in notes
