"""The Ray Data pipeline: every input kind, dense stable ids, held-out eval splits (real Ray, tiny tokenizer)."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from spo_ray.config import DataConfig
from spo_ray.data import prepare_preference_data
from spo_ray.errors import DataError


def pair(i: int) -> dict:
    return {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chosen_texts(ds, tokenizer) -> list[str]:
    rows = sorted(ds.take_all(), key=lambda r: r["example_id"])
    return [tokenizer.decode(r["response_ids"][0][:-1]) for r in rows]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module", autouse=True)
def quiet_ray_data(ray_runtime):
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def test_jsonl_json_parquet_globs_save_to_disk_and_hub_names_form_one_dataset(
    tmp_path, tiny_model_dir, tokenizer
):
    write_jsonl(tmp_path / "a-1.jsonl", [pair(i) for i in range(0, 3)])
    write_jsonl(tmp_path / "a-2.jsonl", [pair(i) for i in range(3, 5)])
    (tmp_path / "b.json").write_text(json.dumps([pair(i) for i in range(5, 7)]))
    pq.write_table(pa.Table.from_pylist([pair(i) for i in range(7, 9)]), tmp_path / "c.parquet")
    datasets.Dataset.from_list([pair(i) for i in range(9, 11)]).save_to_disk(str(tmp_path / "saved"))
    hub_like = tmp_path / "hub"
    hub_like.mkdir()
    write_jsonl(hub_like / "train.jsonl", [pair(i) for i in range(11, 13)])
    cfg = DataConfig(
        train_files=[
            str(tmp_path / "a-*.jsonl"),
            str(tmp_path / "b.json"),
            str(tmp_path / "c.parquet"),
            str(tmp_path / "saved"),
        ],
        hf_dataset=str(hub_like),  # any name datasets.load_dataset accepts; a local folder here
    )
    prepared = prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path / "out"))
    assert prepared.num_train == 13 and prepared.num_responses == 2 and prepared.bad_rows == {}
    assert prepared.eval is None and prepared.quarantine_path is None
    assert chosen_texts(prepared.train, tokenizer) == [f"good answer {i}" for i in range(13)]
    row = prepared.train.take(1)[0]
    assert set(row) == {"example_id", "prompt_ids", "response_ids", "ranking"} and row["ranking"] == [0, 1]


SAME_EXAMPLE_IN_EVERY_FORMAT = {
    "explicit": {"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"},
    "conversational": {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Bye"}],
    },
    "implicit": {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Bye",
    },
    "sharegpt": {
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello"},
        "rejected": {"from": "gpt", "value": "Bye"},
    },
    "binarized": {
        "prompt": "Hi",
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye"}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    },
    "nary": {"prompt": "Hi", "responses": ["Bye", "Hello"], "scores": [0.1, 0.9]},
}


def test_the_same_example_in_each_of_the_six_formats_tokenizes_identically(
    tmp_path, tiny_model_dir, tokenizer
):
    files = [
        write_jsonl(tmp_path / f"{name}.jsonl", [row]) for name, row in SAME_EXAMPLE_IN_EVERY_FORMAT.items()
    ]
    prepared = prepare_preference_data(
        DataConfig(train_files=files), str(tiny_model_dir), str(tmp_path / "out")
    )
    rows = sorted(prepared.train.take_all(), key=lambda r: r["example_id"])
    assert len(rows) == 6
    texts = {
        (
            tokenizer.decode(r["prompt_ids"]),
            tuple(tokenizer.decode(r["response_ids"][i]) for i in r["ranking"]),  # best first
        )
        for r in rows
    }
    assert texts == {
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", ("Hello<|im_end|>", "Bye<|im_end|>"))
    }


def test_nary_rows_are_stored_best_first_and_best_of_n_pads_its_ranking_with_minus_one(
    tmp_path, tiny_model_dir, tokenizer
):
    rows = [
        {"prompt": f"p{i}", "responses": ["a", "b", "c"], "ranking": [2] if i else [1, 2, 0]}
        for i in range(3)
    ]
    cfg = DataConfig(train_files=[write_jsonl(tmp_path / "nary.jsonl", rows)])
    prepared = prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path / "out"))
    assert prepared.num_responses == 3
    stored = {r["example_id"]: r for r in prepared.train.take_all()}
    assert {i: r["ranking"] for i, r in stored.items()} == {0: [0, 1, 2], 1: [0, -1, -1], 2: [0, -1, -1]}
    first = {i: tokenizer.decode(r["response_ids"][0]) for i, r in stored.items()}
    assert first == {0: "b<|im_end|>", 1: "c<|im_end|>", 2: "c<|im_end|>"}


def test_long_rows_are_cut_to_fit_and_counted_or_stop_the_run_when_asked(tmp_path, tiny_model_dir):
    long_rows = [pair(i) | {"rejected": " ".join(["word"] * (60 + i))} for i in range(3)]
    path = write_jsonl(tmp_path / "long.jsonl", [pair(10), *long_rows])
    cfg = DataConfig(train_files=[path], max_length=48, max_prompt_length=24)  # on_long_rows: truncate
    prepared = prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path / "cut"))
    assert prepared.num_train == 4 and prepared.responses_truncated == 3 and not prepared.bad_rows
    assert all(
        len(r["prompt_ids"]) + max(len(x) for x in r["response_ids"]) <= 48 for r in prepared.train.take_all()
    )
    assert json.loads((tmp_path / "cut" / "data" / "summary.json").read_text())["responses_truncated"] == 3
    assert "3 their responses cut to data.max_length" in prepared.truncation_note()
    skipped = prepare_preference_data(
        dataclasses.replace(cfg, on_long_rows="skip"), str(tiny_model_dir), str(tmp_path / "skip")
    )
    assert skipped.num_train == 1 and skipped.bad_rows == {"too_long": 3}
    with pytest.raises(DataError, match=r"long.jsonl:2: rejected: too long.*data.on_long_rows=error"):
        prepare_preference_data(
            dataclasses.replace(cfg, on_long_rows="error"), str(tiny_model_dir), str(tmp_path / "stop")
        )


def test_eval_fraction_holds_out_a_seeded_disjoint_split_with_dense_ids(tmp_path, tiny_model_dir, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(i) for i in range(20)])

    def split(seed: int):
        cfg = DataConfig(train_files=[path], eval_fraction=0.25, shuffle_seed=seed)
        prepared = prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path / f"out{seed}"))
        assert (prepared.num_train, prepared.num_eval) == (15, 5)
        train, held_out = prepared.train.take_all(), prepared.eval.take_all()
        assert sorted(r["example_id"] for r in train) == list(range(15))
        assert sorted(r["example_id"] for r in held_out) == list(range(5))
        return set(chosen_texts(prepared.train, tokenizer)), set(chosen_texts(prepared.eval, tokenizer))

    train, held_out = split(seed=0)
    assert not train & held_out and len(train | held_out) == 20
    assert split(seed=0) == (train, held_out)
    assert split(seed=1)[1] != held_out


def test_eval_files_give_a_separate_eval_dataset(tmp_path, tiny_model_dir, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [pair(i) for i in range(4)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [pair(i) for i in range(100, 103)])
    cfg = DataConfig(train_files=[train], eval_files=[held_out], eval_fraction=0.5)  # files win over fraction
    prepared = prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path / "out"))
    assert (prepared.num_train, prepared.num_eval) == (4, 3)
    assert chosen_texts(prepared.eval, tokenizer) == [f"good answer {i}" for i in range(100, 103)]
    assert prepared.summary()["num_eval"] == 3
