"""`spo-ray generate` end to end: prompts file in, one JSONL row per sample out, with a progress bar."""

from __future__ import annotations

import json

import pytest

from spo_ray.cli import main


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "What is the blue sky?"},
        {"prompt": [{"role": "user", "content": "Explain fresh bread?"}]},
        {"prompt": [1, 280, 201, 364]},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_generate_command_writes_one_row_per_sample(
    backend, ray_runtime, tiny_model_dir, prompts_file, tmp_path, capsys
):
    out = tmp_path / "out" / "samples.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts_file), "--out", str(out)]
    argv += [
        "--n",
        "2",
        "--max-tokens",
        "8",
        "--backend",
        backend,
        "--batch-size",
        "2",
        "--max-model-len",
        "256",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [
        (p, s) for p in range(3) for s in range(2)
    ]
    for row in rows:
        assert 1 <= len(row["token_ids"]) <= 8 and len(row["logprobs"]) == len(row["token_ids"])
        assert row["finish_reason"] in ("stop", "length") and row["policy_version"] == 0
    assert rows[4]["prompt"] == [1, 280, 201, 364] == rows[4]["prompt_token_ids"]
    captured = capsys.readouterr()
    assert "3/3" in captured.err  # the progress bar reached the end
    assert f"wrote 6 samples for 3 prompts to {out}" in captured.out


def test_generate_command_reports_a_missing_model_or_prompts_file_with_exit_2(tmp_path, prompts_file, capsys):
    argv = ["generate", "--model", str(tmp_path / "nope"), "--prompts", str(prompts_file), "--out", "x.jsonl"]
    assert main(argv) == 2
    assert "model path" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    argv = [
        "generate",
        "--model",
        str(tmp_path / "model"),
        "--prompts",
        str(tmp_path / "none.jsonl"),
        "--out",
        "x",
    ]
    assert main(argv) == 2
    assert "prompts file" in capsys.readouterr().err
