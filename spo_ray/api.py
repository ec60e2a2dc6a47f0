"""The public Python API: `train`, `iterate`, `generate`, `extrapolate` and their results (see README: Python API).

Each function takes a `Config` (or a recipe path, or a dict of sections) plus overrides, joins the caller's
Ray runtime when one is running (`ray.init(...)` or `RAY_ADDRESS`) and leaves it running; otherwise it starts
a local one sized for the run. The CLI and `jobs/` call these same functions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_ray.config import Config, Overrides, validate
from spo_ray.errors import ConfigError

if TYPE_CHECKING:
    from spo_ray.training.callbacks import Callback

ConfigLike = Config | str | os.PathLike | Mapping[str, Any] | None


@dataclass
class TrainResult:
    """What a training run produced: `summary` (as in summary.json), the per-step `metrics`, the last
    complete `checkpoint` folder (resume point), the exported `final_model` folder and the `output_dir`."""

    summary: dict
    metrics: list[dict]
    checkpoint: str | None
    final_model: str
    output_dir: str


@dataclass
class IterateResult:
    """What iterative rounds produced: `summary` (summary.json), one record per round in `rounds` (round 0 is
    the starting policy), the last round's `final_model` and the `output_dir`."""

    summary: dict
    rounds: list[dict]
    final_model: str
    output_dir: str


def as_config(
    config: ConfigLike = None, overrides: Overrides = (), output_dir: str | os.PathLike | None = None
) -> Config:
    """A validated Config from a Config, a YAML recipe path, a dict of sections or nothing (the defaults)."""
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, (str, os.PathLike)):
        cfg = Config.from_yaml(config)
    elif isinstance(config, Mapping):
        cfg = Config.from_dict(config)
    else:
        raise TypeError(
            f"config must be a Config, a YAML path or a dict of sections, not {type(config).__name__}"
        )
    extra = _as_mapping(overrides)
    if output_dir is not None:
        extra["output.dir"] = os.fspath(output_dir)
    return cfg.with_overrides(extra) if extra else validate(cfg, check_files=False)


def train(
    config: ConfigLike = None,
    *,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    callbacks: Sequence[Callback] = (),
    overrides: Overrides = (),
    output_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train per `config` (SPO by default); re-running with the same output dir resumes from its checkpoint.

    `train_dataset` / `eval_dataset`: a list of dicts, a pandas DataFrame, a `datasets.Dataset`, a
    `ray.data.Dataset`, or paths in any of the data formats; they replace `data.train_files` /
    `data.eval_files`. `callbacks`: `spo_ray.Callback`s, called in this process on each step, evaluation
    and checkpoint. With `task.name` set the built-in task writes its own data and is evaluated exactly.
    """
    from spo_ray.tasks import run_job
    from spo_ray.training.metrics import read_metrics

    cfg = _with_datasets(as_config(config, overrides, output_dir), train_dataset, eval_dataset)
    summary = run_job(validate(cfg, check_files=True), callbacks=callbacks)
    return TrainResult(
        summary=summary,
        metrics=read_metrics(cfg.output.dir),
        checkpoint=summary.get("checkpoint"),
        final_model=summary["final_model"],
        output_dir=cfg.output.dir,
    )


def iterate(
    config: ConfigLike = None,
    *,
    prompts: Sequence[Any] | str | os.PathLike | None = None,
    callbacks: Sequence[Callback] = (),
    overrides: Overrides = (),
    output_dir: str | os.PathLike | None = None,
) -> IterateResult:
    """Iterative online rounds (generate, judge, train, sync); re-running with the same output dir resumes.

    `prompts`: the rounds' prompts (texts or chat message lists), or a prompts file (text, one per line, or
    JSONL); they replace `iterate.prompts_file`. `callbacks`: `spo_ray.Callback`s called in this process on
    each step, evaluation and checkpoint of every round's training; each round's steps count from 1 and the
    callback's `round` attribute says which round it is (a resumed run calls them for the steps it runs);
    a callback that raises stops the rounds with `CallbackError` once that round's training ends.
    """
    from spo_ray.iterative import run_iterate

    cfg = as_config(config, overrides, output_dir)
    if prompts is not None:
        cfg = cfg.with_overrides({"iterate.prompts_file": _prompts_file(prompts, cfg)})
    summary = run_iterate(validate(cfg, check_files=True), callbacks=callbacks)
    return IterateResult(
        summary=summary,
        rounds=summary["rounds"],
        final_model=summary["final_model"],
        output_dir=cfg.output.dir,
    )


def generate(
    model: str | os.PathLike, prompts: Sequence[Any] | str | os.PathLike, **settings: Any
) -> list[dict]:
    """Samples of `model` for `prompts` (texts, chat message lists or token ids, or a prompts file), one dict
    per sample; `settings` are those of `spo_ray.rollout.batch.generate_rows` (n, max_tokens, temperature,
    top_p, backend, num_actors, seed, out=a JSONL path to also write, ...)."""
    from spo_ray.data.prompts import read_prompts
    from spo_ray.rollout.batch import generate_rows

    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(prompts, "prompts", token_ids=True, keep_text=True)
    return generate_rows(model, list(prompts), **settings)


def extrapolate(
    sft: str | os.PathLike, aligned: str | os.PathLike, weight: float, out: str | os.PathLike
) -> Path:
    """ExPO: write θ_aligned + weight·(θ_aligned − θ_sft) as a Hugging Face folder at `out`; return its path."""
    from spo_ray.models.extrapolate import extrapolate as write_extrapolated

    return write_extrapolated(sft, aligned, weight, out)


def _as_mapping(overrides: Overrides) -> dict:
    if isinstance(overrides, str):  # one "a.b=v" string would otherwise be read character by character
        raise ConfigError(overrides, "overrides must be a mapping or a list of section.key=value strings")
    if isinstance(overrides, Mapping):
        return dict(overrides)
    from spo_ray.config import parse_override

    return {".".join(keys): value for keys, value in map(parse_override, overrides)}


def _scratch(cfg: Config) -> Path:
    """The run's local scratch folder for inputs given as objects (the output dir itself when local)."""
    from spo_ray import storage

    return storage.work_dir(storage.output_location(cfg.output.dir)) / "inputs"


def _with_datasets(cfg: Config, train_dataset: Any, eval_dataset: Any) -> Config:
    from spo_ray.data.in_memory import dataset_files

    if train_dataset is None and eval_dataset is None:
        return cfg
    if cfg.task.name != "none":
        raise ConfigError(
            "task.name",
            f"'{cfg.task.name}' writes its own data; drop train_dataset/eval_dataset or set task.name to none",
        )
    data = cfg.data
    if train_dataset is not None:
        files = dataset_files(train_dataset, _scratch(cfg), "train_dataset")
        data = dataclasses.replace(data, train_files=files, hf_dataset="")
    if eval_dataset is not None:
        data = dataclasses.replace(
            data, eval_files=dataset_files(eval_dataset, _scratch(cfg), "eval_dataset")
        )
    return dataclasses.replace(cfg, data=data)


def _prompts_file(prompts: Sequence[Any] | str | os.PathLike, cfg: Config) -> str:
    if isinstance(prompts, (str, os.PathLike)):
        return os.fspath(prompts)
    from spo_ray.data.in_memory import dataset_files

    return dataset_files([{"prompt": prompt} for prompt in prompts], _scratch(cfg), "prompts")[0]
