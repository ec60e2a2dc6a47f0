"""One prompt reader for every command: text files, JSONL rows (text, messages, ids), errors naming file:line and key."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from spo_ray.config import DataConfig
from spo_ray.data import load_reg_prompts, read_prompts
from spo_ray.errors import DataError

HI = [{"role": "user", "content": "Hi"}]


def _jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_a_text_file_holds_one_prompt_per_line_and_blank_lines_are_not_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Tell me a story\n\n  Why is the sky blue?\r\nTell me a story\n")
    assert read_prompts(path, "iterate.prompts_file") == [
        [{"role": "user", "content": "Tell me a story"}],
        [{"role": "user", "content": "  Why is the sky blue?"}],
        [{"role": "user", "content": "Tell me a story"}],
    ]
    assert read_prompts(path, "prompts", keep_text=True, dedupe=True) == [
        "Tell me a story",
        "  Why is the sky blue?",
    ]


def test_jsonl_rows_give_text_messages_or_token_ids_where_ids_are_allowed(tmp_path):
    path = _jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": HI}, {"prompt": [1, 280, 201]}, "[5, 6]"]
    )
    assert read_prompts(path, "prompts", token_ids=True, keep_text=True) == ["Hi", HI, [1, 280, 201], [5, 6]]
    assert read_prompts(path, "prompts", token_ids=True, dedupe=True) == [HI, [1, 280, 201], [5, 6]]


def test_a_bad_row_is_refused_naming_its_file_line_and_the_key_that_named_the_file(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, "", {"text": "no prompt"}])
    with pytest.raises(DataError) as info:
        read_prompts(path, "data.reg_prompts_file")
    assert str(info.value).startswith(f"{path}:3: prompt: missing field")
    assert str(info.value).endswith("(data.reg_prompts_file)")
    _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, "{not json"])
    with pytest.raises(DataError, match=rf"^{path}:2: <row>: invalid JSON.*\(iterate.prompts_file\)$"):
        read_prompts(path, "iterate.prompts_file")
    with pytest.raises(DataError, match=r"iterate.prompts_file: prompts file '.*none.jsonl' does not exist"):
        read_prompts(tmp_path / "none.jsonl", "iterate.prompts_file")


def test_token_ids_are_refused_where_the_caller_needs_text_or_messages(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": [1, 280, 201]}])
    with pytest.raises(DataError, match=rf"^{path}:2: prompt: wrong type: token ids are not accepted here"):
        read_prompts(path, "iterate.prompts_file")
    with pytest.raises(DataError, match=r":1: prompt: wrong type: token ids must be >= 0"):
        read_prompts(_jsonl(tmp_path / "n.jsonl", [{"prompt": [3, -1]}]), "prompts", token_ids=True)


def test_skipped_reg_prompt_rows_are_counted_and_the_rest_templated(tiny_model_dir, tmp_path, capsys):
    path = _jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": [1, 2]}, {"prompt": ""}, {"prompt": HI}]
    )
    cfg = DataConfig(train_files=[path], reg_prompts_file=path, on_bad_rows="skip")
    prompts = load_reg_prompts(cfg, str(tiny_model_dir))
    decode = AutoTokenizer.from_pretrained(tiny_model_dir).decode
    assert [decode(p) for p in prompts] == ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    note = capsys.readouterr().out
    assert f"skipped 2 bad rows of data.reg_prompts_file={path} (empty 1, wrong_type 1;" in note
    assert f"the first: {path}:2: prompt: wrong type" in note
    with pytest.raises(DataError, match=rf"^{path}:2: .*\(data.reg_prompts_file\)$"):
        load_reg_prompts(DataConfig(train_files=[path], reg_prompts_file=path), str(tiny_model_dir))
