"""`data:`: the preference data pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spo_ray.config.fields import option


@dataclass
class SourceConfig:
    files: list[str] = option([], "this source's files, globs or folders (as data.train_files)")
    hf_dataset: str = option(
        "", "or a dataset for datasets.load_dataset: a local dataset folder or a hub name"
    )
    hf_config: str = option("", "config (subset) name of hf_dataset")
    hf_split: str = option("train", "split of hf_dataset or of a save_to_disk folder")
    columns: dict[str, str] = option(
        {}, "column mapping of this source (as data.columns); empty: data.columns"
    )
    weight: float = option(1.0, "share of the mixture: weight / sum of all sources' weights", gt=0)


@dataclass
class DataConfig:
    train_files: list[str] = option(
        [], "preference data: JSONL/JSON/Parquet/CSV files, globs, folders, save_to_disk folders"
    )
    eval_files: list[str] = option([], "held-out preference data; empty means split by eval_fraction")
    eval_fraction: float = option(
        0.0, "fraction of train rows held out for eval when eval_files is empty", ge=0, lt=1
    )
    hf_dataset: str = option(
        "",
        "a dataset for datasets.load_dataset: a local dataset folder (scripts, README configs) or a hub name",
    )
    hf_config: str = option("", "config (subset) name of hf_dataset, e.g. 'default' or 'en'")
    hf_split: str = option("train", "split of hf_dataset")
    columns: dict[str, str] = option(
        {},
        "rename source columns to the format's fields, {field: column}, e.g. {prompt: question, chosen: good, "
        "rejected: bad}; a column missing from a file is an error naming data.columns.<field>",
    )
    sources: list[SourceConfig] = option(
        [],
        "a weighted mixture instead of train_files/hf_dataset: [{files: [a.jsonl], weight: 0.7}, {hf_dataset: "
        "DIR, hf_config: NAME, weight: 0.3}]; README: Mixtures",
    )
    mixture_size: int = option(
        0,
        "rows of the mixture (0: as many as its sources hold together); source i gives round(size * w_i / sum w) "
        "rows: sampled without replacement when it has more, all of them repeated (then a seeded sample) when fewer",
        ge=0,
    )
    format: Literal["auto", "explicit", "conversational", "implicit", "sharegpt", "binarized", "nary"] = (
        option("auto", "row format; 'auto' detects it from the fields")
    )
    max_length: int = option(
        512,
        "max tokens of prompt + response: prompts are cut to max_prompt_length first, then data.on_long_rows "
        "decides about responses that still do not fit",
        ge=8,
    )
    max_prompt_length: int = option(
        256, "max prompt tokens: longer prompts keep their last tokens (cut from the left)", ge=1
    )
    on_long_rows: Literal["truncate", "skip", "error"] = option(
        "truncate",
        "a response longer than max_length leaves after the prompt: 'truncate' keeps its first tokens (as TRL "
        "does; counted in the summary), 'skip' quarantines the row and counts it, 'error' stops at it",
    )
    on_bad_rows: Literal["error", "skip"] = option(
        "error", "'error' stops at the first bad row; 'skip' quarantines bad rows and counts them"
    )
    shuffle_seed: int = option(0, "seed of the deterministic per-epoch shuffle")
    packing: bool = option(False, "padding-free packing of sequences for the trainer")
    reg_prompts_file: str = option(
        "",
        "prompts for the global KL regularizer (text, one per line, or JSONL with 'prompt'); empty: the training prompts",
    )
    dimension: str = option(
        "",
        "keep only rows labelled with this preference dimension: a row's 'dimension' (string) or 'dimensions' "
        "(list); a row with neither, or a bad one, is a bad row (data.on_bad_rows); empty: all rows, labels "
        "unread. Sequential PO's `spo-ray stages` sets it per stage",
    )
