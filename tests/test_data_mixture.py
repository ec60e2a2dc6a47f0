"""Data sources beyond plain files: dataset config names, column mappings and a weighted, seeded mixture
(real Ray Data, tiny tokenizer, real files)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from spo_ray.config import DataConfig, SourceConfig, load_config
from spo_ray.data import prepare_preference_data
from spo_ray.errors import ConfigError


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def renamed(tag: str, n: int) -> list[dict]:
    return [
        {"question": f"{tag} question {i}?", "good": f"{tag} good {i}", "bad": f"{tag} bad {i}"}
        for i in range(n)
    ]


def pair(tag: str, i: int) -> dict:
    return {"prompt": f"{tag} question {i}?", "chosen": f"{tag} good {i}", "rejected": f"{tag} bad {i}"}


def chosen_texts(prepared, tokenizer) -> list[str]:
    rows = prepared.train_rows.read(np.arange(prepared.num_train)).to_pylist()
    return [tokenizer.decode(r["response_ids"][0][:-1]) for r in rows]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module", autouse=True)
def quiet_ray_data(ray_runtime):
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def dataset_with_configs(folder) -> str:
    """A local `load_dataset` folder with two configs (subsets) declared in its README, as on the hub."""
    for name in ("easy", "hard"):
        (folder / name).mkdir(parents=True)
        write_jsonl(folder / name / "train.jsonl", [pair(name, i) for i in range(3 if name == "easy" else 5)])
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: easy\n  data_files:\n  - split: train\n    path: easy/train.jsonl\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n---\n"
    )
    return str(folder)


def test_hf_dataset_config_name_picks_the_subset(tmp_path, tiny_model_dir, tokenizer):
    folder = dataset_with_configs(tmp_path / "ds")
    hard = prepare_preference_data(
        DataConfig(hf_dataset=folder, hf_config="hard"), str(tiny_model_dir), str(tmp_path / "o1")
    )
    assert hard.num_train == 5 and all(t.startswith("hard good") for t in chosen_texts(hard, tokenizer))
    easy = prepare_preference_data(
        DataConfig(hf_dataset=folder, hf_config="easy"), str(tiny_model_dir), str(tmp_path / "o1")
    )
    assert easy.num_train == 3 and not easy.cache_reused  # the config name is part of the cache key


def test_column_mapping_renames_columns_of_jsonl_and_parquet(tmp_path, tiny_model_dir, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", renamed("a", 3))
    pq.write_table(pa.Table.from_pylist(renamed("b", 2)), tmp_path / "b.parquet")
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    cfg = DataConfig(train_files=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], columns=columns)
    out = str(tmp_path / "out")
    prepared = prepare_preference_data(cfg, str(tiny_model_dir), out)
    assert prepared.num_train == 5 and prepared.bad_rows == {}
    assert chosen_texts(prepared, tokenizer) == [f"a good {i}" for i in range(3)] + [
        f"b good {i}" for i in range(2)
    ]

    swapped = DataConfig(
        train_files=cfg.train_files, columns={**columns, "chosen": "bad", "rejected": "good"}
    )
    again = prepare_preference_data(swapped, str(tiny_model_dir), out)
    assert not again.cache_reused  # another mapping re-tokenizes
    assert chosen_texts(again, tokenizer)[0] == "a bad 0"


def test_a_mapping_naming_a_missing_column_names_the_key_and_the_file(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "a.jsonl", renamed("a", 2))
    cfg = DataConfig(train_files=[data], columns={"prompt": "question", "chosen": "best", "rejected": "bad"})
    with pytest.raises(ConfigError) as info:
        prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path / "out"))
    assert info.value.key == "data.columns.chosen"
    assert (
        "'best'" in str(info.value) and data in str(info.value) and "question, good, bad" in str(info.value)
    )


def test_weighted_mixture_takes_rows_in_proportion_deterministically(tmp_path, tiny_model_dir, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [pair("a", i) for i in range(40)])
    write_jsonl(tmp_path / "b.jsonl", renamed("b", 6))
    sources = [
        SourceConfig(files=[str(tmp_path / "a.jsonl")], weight=0.7),
        SourceConfig(
            files=[str(tmp_path / "b.jsonl")],
            columns={"prompt": "question", "chosen": "good", "rejected": "bad"},
            weight=0.3,
        ),
    ]
    cfg = DataConfig(sources=sources, mixture_size=30)
    prepared = prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path / "out"))
    texts = chosen_texts(prepared, tokenizer)
    by_source = Counter(t.split()[0] for t in texts)
    print(f"mixture counts: {dict(by_source)}; summary: {prepared.summary()['mixture']}")
    assert prepared.num_train == 30 and by_source == {"a": 21, "b": 9}
    assert len({t for t in texts if t.startswith("a")}) == 21  # 21 of 40: sampled without replacement
    assert {t for t in texts if t.startswith("b")} == {
        f"b good {i}" for i in range(6)
    }  # 9 of 6: all, then 3 more
    assert prepared.summary()["mixture"] == [
        {"weight": 0.7, "rows": 40, "taken": 21},
        {"weight": 0.3, "rows": 6, "taken": 9},
    ]
    assert any("mixture of 30 rows" in line for line in prepared.notes())

    again = prepare_preference_data(cfg, str(tiny_model_dir), str(tmp_path / "out2"))
    assert chosen_texts(again, tokenizer) == texts  # same seed, same rows
    reweighted = DataConfig(sources=[sources[0], SourceConfig(**{**sources[1].__dict__, "weight": 0.7})])
    other = prepare_preference_data(reweighted, str(tiny_model_dir), str(tmp_path / "out"))
    assert not other.cache_reused and other.num_train == 46  # mixture_size 0: all rows of both sources
    assert Counter(t.split()[0] for t in chosen_texts(other, tokenizer)) == {"a": 23, "b": 23}


def test_mixture_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight"):
        load_config(
            overrides=["data.sources=[{files: [a.jsonl]}, {files: [b.jsonl], weight: 0}]"], check_files=False
        )
    with pytest.raises(ConfigError, match=r"data.sources\[0\]"):
        load_config(overrides=["data.sources=[{weight: 1}]"], check_files=False)
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        load_config(
            overrides=["data.sources=[{files: [a.jsonl]}]", "data.eval_fraction=0.1"], check_files=False
        )
    with pytest.raises(ConfigError, match="data.sources"):
        load_config(
            overrides=["data.sources=[{files: [a.jsonl]}]", "data.train_files=[b.jsonl]"], check_files=False
        )
