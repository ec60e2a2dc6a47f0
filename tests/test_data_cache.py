"""Tokenize once: a restart reuses the tokenized parts until a file, the tokenizer or a setting changes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from spo_ray.config import DataConfig
from spo_ray.data import prepare_preference_data


@pytest.fixture(scope="module", autouse=True)
def quiet_ray_data(ray_runtime):
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def write_pairs(path, count: int, tag: str = "") -> str:
    rows = [
        {"prompt": f"question {i}?", "chosen": f"good {tag}{i}", "rejected": f"bad {i}"} for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def all_rows(prepared) -> list[tuple]:
    table = prepared.train_rows.read(np.arange(prepared.num_train))
    return list(zip(*(table.column(c).to_pylist() for c in ("example_id", "prompt_ids", "response_ids"))))


def test_a_restart_reuses_the_tokens_until_the_file_the_tokenizer_or_a_setting_changes(
    tmp_path, tiny_model_dir
):
    data = write_pairs(tmp_path / "pairs.jsonl", 9)
    out = str(tmp_path / "out")
    cfg = DataConfig(train_files=[data])
    first = prepare_preference_data(cfg, str(tiny_model_dir), out)
    parts = sorted(os.listdir(os.path.join(first.cache_dir, "train")))
    stamps = {p: os.stat(os.path.join(first.cache_dir, "train", p)).st_mtime_ns for p in parts}
    again = prepare_preference_data(cfg, str(tiny_model_dir), out)
    assert (first.cache_reused, again.cache_reused) == (False, True)
    assert again.cache_dir == first.cache_dir and all_rows(again) == all_rows(first)
    assert {p: os.stat(os.path.join(again.cache_dir, "train", p)).st_mtime_ns for p in parts} == stamps
    assert any("reusing the tokenized data" in line for line in again.notes())

    write_pairs(tmp_path / "pairs.jsonl", 9, tag="new ")  # same rows count, other text
    changed = prepare_preference_data(cfg, str(tiny_model_dir), out)
    assert not changed.cache_reused and all_rows(changed) != all_rows(first)
    assert not os.path.exists(first.cache_dir)  # the stale cache is removed
    shorter = prepare_preference_data(
        DataConfig(train_files=[data], max_prompt_length=4), str(tiny_model_dir), out
    )
    assert not shorter.cache_reused and max(len(r[1]) for r in all_rows(shorter)) <= 4

    other_tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_model_dir, other_tokenizer)
    template = other_tokenizer / "chat_template.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}> {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    retokenized = prepare_preference_data(cfg, str(other_tokenizer), out)
    assert not retokenized.cache_reused and all_rows(retokenized) != all_rows(changed)


KILLED_PREPARATION = """
import sys, ray
from spo_ray.config import DataConfig
from spo_ray.data import prepare_preference_data
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
prepare_preference_data(DataConfig(train_files=[sys.argv[2]]), sys.argv[3], sys.argv[4])
"""


def test_a_preparation_killed_midway_is_never_reused(tmp_path, tiny_model_dir, ray_runtime):
    data = write_pairs(tmp_path / "pairs.jsonl", 5000)  # two chunks: a part file appears long before the end
    out = tmp_path / "out"
    address = ray_runtime.get_runtime_context().gcs_address
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_PREPARATION, address, data, str(tiny_model_dir), str(out)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    deadline = time.monotonic() + 120
    partial = []
    while not partial and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
        tmp_dirs = [d for d in (out / "data").glob(".tmp-*")] if (out / "data").exists() else []
        partial = [p for d in tmp_dirs for p in (d / "train").glob("part-*.arrow")]
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert partial, "the preparation finished or never wrote a part before it could be killed"
    assert not list((out / "data").glob("*/manifest.json"))  # nothing complete was left behind
    prepared = prepare_preference_data(DataConfig(train_files=[data]), str(tiny_model_dir), str(out))
    assert not prepared.cache_reused and prepared.num_train == 5000
    assert not list((out / "data").glob(".tmp-*"))  # the killed run's folder is gone
    assert sorted(prepared.train_rows.read(np.arange(5000)).column("example_id").to_pylist()) == list(
        range(5000)
    )


def test_a_chunk_task_whose_preparation_folder_was_removed_fails_instead_of_recreating_it(tmp_path):
    # a Ray task can outlive its killed preparation; the next preparation removes that run's .tmp-* folder,
    # and the task's next part must not bring the folder back (it did: makedirs recreated it)
    from spo_ray.data.processing import ChunkResult, _Writer

    gone = tmp_path / ".tmp-key-dead"
    writer = _Writer(ChunkResult(index=0, role="train"), str(gone))
    with pytest.raises(FileNotFoundError):
        writer.subfolder("train")
    assert not gone.exists()
    gone.mkdir()  # a live preparation's folder: its subfolders are made, once or many times
    assert writer.subfolder("train") == writer.subfolder("train") == str(gone / "train")
    assert (gone / "train").is_dir()
