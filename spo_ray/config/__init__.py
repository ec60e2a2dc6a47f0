"""One typed config tree: YAML + dotted overrides, validated before anything starts.

Every field carries a one-line help (shown by `spo-ray config show`) and a default that works on a
laptop CPU. Errors name the key (`loss.alpha`) and say what to do; the CLI turns them into exit 2.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from spo_ray.config.data import DataConfig, SourceConfig
from spo_ray.config.fields import option, section
from spo_ray.config.loss import LossConfig
from spo_ray.config.model import LoraConfig, ModelConfig, TinyModelConfig
from spo_ray.config.output import LoggingConfig, OutputConfig
from spo_ray.config.regularizer import check_regularizer, check_rollout, draws_online_samples
from spo_ray.config.rollout import RolloutConfig
from spo_ray.config.rounds import IterateConfig, JudgeConfig, StagesConfig, TaskConfig
from spo_ray.config.train import TrainConfig
from spo_ray.errors import ConfigError


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig, "policy and reference models")
    data: DataConfig = section(DataConfig, "preference data pipeline")
    rollout: RolloutConfig = section(RolloutConfig, "online sampling and weight sync")
    train: TrainConfig = section(TrainConfig, "Ray Train loop")
    loss: LossConfig = section(LossConfig, "preference loss and global KL regularizer")
    task: TaskConfig = section(TaskConfig, "built-in task (data, reference and exact evaluation)")
    judge: JudgeConfig = section(JudgeConfig, "preference oracle of iterative rounds (spo-ray iterate)")
    iterate: IterateConfig = section(IterateConfig, "iterative online rounds (spo-ray iterate)")
    logging: LoggingConfig = section(LoggingConfig, "metrics and progress")
    output: OutputConfig = section(OutputConfig, "where results go")
    stages: StagesConfig = section(
        StagesConfig, "Sequential PO: one training stage per dimension (spo-ray stages)"
    )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Overrides = ()) -> Config:
        """A recipe file plus overrides (`{"loss.alpha": 0.5}` or `["loss.alpha=0.5"]`), validated.

        Files the config names are checked where they are used (`spo_ray.train` checks them), so a
        cluster recipe can be built and inspected on a laptop.
        """
        return load_config(path, overrides, check_files=False)

    @classmethod
    def from_dict(cls, data: typing.Mapping[str, Any], overrides: Overrides = ()) -> Config:
        """Nested sections (`{"loss": {"alpha": 0.5}}`) plus overrides, validated; unknown keys are named."""
        tree = copy.deepcopy(dict(data))
        apply_overrides(tree, overrides)
        return validate(_build(Config, tree, ""), check_files=False)

    def with_overrides(self, overrides: Overrides) -> Config:
        """A validated copy with dotted overrides applied (`cfg.with_overrides({"train.max_steps": 20})`)."""
        return Config.from_dict(config_to_dict(self), overrides)

    def to_dict(self) -> dict:
        return config_to_dict(self)


# `{"section.key": value}` (values taken as given) or `["section.key=value"]` (values read as YAML)
Overrides = typing.Mapping[str, Any] | typing.Sequence[str]


# ---------------------------------------------------------------------------------------------------
# Loading


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float only)."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                key, f"{value!r} is not one of {list(choices)}{_did_you_mean(str(value), map(str, choices))}"
            )
        return value
    if origin in (list, typing.List):  # noqa: UP006
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp)
        if _is_section(item_tp):
            return [_build(item_tp, item, f"{key}[{i}]") for i, item in enumerate(value)]
        return [_coerce(f"{key}[{i}]", item, item_tp) for i, item in enumerate(value)]
    if origin in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, dict):
            raise ConfigError(
                key, f"expected a mapping such as {{name: value}}, got {type(value).__name__} {value!r}"
            )
        _, value_tp = get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if origin in (Union, types.UnionType):
        raise TypeError(f"config field {key} uses a Union; use a default value instead")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


# Keys that were renamed: the old key fails with a message naming its replacement.
RENAMED_KEYS = {
    "loss.ref_beta": "renamed: DPO's beta is now loss.beta (as in TRL); the global KL weight is loss.kl_coef",
}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if key in RENAMED_KEYS:
            raise ConfigError(key, RENAMED_KEYS[key])
        if name not in names:
            raise ConfigError(
                key, f"unknown key{_did_you_mean(str(name), names)}; known keys here: {', '.join(names)}"
            )
        tp = hints[name]
        kwargs[name] = _build(tp, value, key) if _is_section(tp) else _coerce(key, value, tp)
    return cls(**kwargs)


def _check_ranges(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key)
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_ranges(item, f"{key}[{i}]")
        meta = f.metadata
        for check, ok, words in (
            ("gt", lambda v, b: v > b, "greater than"),
            ("ge", lambda v, b: v >= b, "at least"),
            ("lt", lambda v, b: v < b, "less than"),
            ("le", lambda v, b: v <= b, "at most"),
        ):
            if check in meta and not ok(value, meta[check]):
                raise ConfigError(key, f"{value!r} is out of range: must be {words} {meta[check]}")


def missing_files(cfg: Config) -> list[ConfigError]:
    """One ConfigError per file or folder the config names that does not exist here (globs are not checked)."""
    from glob import has_magic

    missing: list[ConfigError] = []

    def need(key: str, path: str) -> None:
        if path and not has_magic(path) and not os.path.exists(path):
            missing.append(
                ConfigError(
                    key, f"file or folder '{path}' does not exist (relative paths are from {os.getcwd()})"
                )
            )

    if cfg.model.path not in ("tiny", "smollm2"):
        need("model.path", cfg.model.path)
    need("model.reference_path", cfg.model.reference_path)
    for i, path in enumerate(cfg.data.train_files):
        need(f"data.train_files[{i}]", path)
    for i, path in enumerate(cfg.data.eval_files):
        need(f"data.eval_files[{i}]", path)
    for i, source in enumerate(cfg.data.sources):
        for j, path in enumerate(source.files):
            need(f"data.sources[{i}].files[{j}]", path)
    need("data.reg_prompts_file", cfg.data.reg_prompts_file)
    need("iterate.prompts_file", cfg.iterate.prompts_file)
    if cfg.judge.name in ("reward_model", "llm_judge") and cfg.judge.model_path != "smollm2":
        need("judge.model_path", cfg.judge.model_path)
    return missing


def _check_sources(data: DataConfig) -> None:
    if not data.sources:
        if data.mixture_size:
            raise ConfigError("data.mixture_size", "applies to a mixture: set data.sources")
        return
    if data.train_files or data.hf_dataset:
        raise ConfigError(
            "data.sources", "give the data either as data.sources or as data.train_files/hf_dataset"
        )
    if data.eval_fraction > 0:
        raise ConfigError(
            "data.eval_fraction", "a mixture may repeat rows; hold out data with data.eval_files"
        )
    for i, source in enumerate(data.sources):
        if bool(source.files) == bool(source.hf_dataset):
            raise ConfigError(f"data.sources[{i}]", "give files or hf_dataset (one of them)")


def validate(cfg: Config, check_files: bool = True) -> Config:
    """Check ranges, cross-field rules and (optionally) that named files exist; raise ConfigError."""
    _check_ranges(cfg)
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            "data.max_prompt_length",
            f"{cfg.data.max_prompt_length} leaves no room for a response within data.max_length={cfg.data.max_length}",
        )
    _check_sources(cfg.data)
    from spo_ray.losses import get_loss

    try:
        get_loss(cfg.loss.name)
    except ValueError as exc:
        raise ConfigError("loss.name", str(exc)) from None
    if cfg.loss.pair_weight_gamma > 0 and cfg.loss.name != "spo":
        raise ConfigError(
            "loss.pair_weight_gamma",
            f"weights the pairs of loss.name=spo only, not {cfg.loss.name}; set it to 0 or use loss.name=spo",
        )
    check_regularizer(cfg)
    check_rollout(cfg)
    if cfg.loss.sspo_lambda > 0 and cfg.loss.name == "sppo":
        raise ConfigError(
            "loss.sspo_lambda",
            "degrades each row's chosen response, and sppo's self-play rows have none; set it to 0 for sppo",
        )
    from spo_ray.storage import check_scheme

    check_scheme(cfg.output.dir, "output.dir")
    if check_files:
        missing = missing_files(cfg)
        if missing:
            raise missing[0]
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`loss.alpha=0.5` -> (['loss', 'alpha'], 0.5); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value (e.g. --set loss.alpha=0.5)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: Overrides) -> None:
    """Set each dotted key in the nested dict `tree`, creating sections on the way."""
    if isinstance(overrides, str):
        raise ConfigError(overrides, "overrides must be a mapping or a list of section.key=value strings")
    if isinstance(overrides, typing.Mapping):
        items = [(str(key).split("."), value) for key, value in overrides.items()]
    else:
        items = [parse_override(text) for text in overrides]
    for keys, value in items:
        node = tree
        for depth, name in enumerate(keys[:-1]):
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys[: depth + 1]), "is a value, not a section")
            node = child
        node[keys[-1]] = value


def load_config(
    path: str | os.PathLike | None = None, overrides: Overrides = (), check_files: bool = True
) -> Config:
    """Read YAML (or defaults), apply dotted overrides, build the typed tree and validate it."""
    data: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError("--config", f"config file '{path}' does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("--config", f"{path} must hold a mapping of sections (model:, data:, ...)")
    apply_overrides(data, overrides)
    return validate(_build(Config, data, ""), check_files=check_files)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, check_files: bool = False) -> Config:
    """Rebuild a Config from `config_to_dict` output (e.g. inside Ray workers)."""
    return validate(_build(Config, data, ""), check_files=check_files)


def dump_yaml(cfg: Any, with_help: bool = True, indent: int = 0) -> str:
    """The resolved config as YAML, each key followed by its help as a comment."""
    lines = []
    pad = "  " * indent
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        comment = f"  # {f.metadata['help']}" if with_help and "help" in f.metadata else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{comment}")
            lines.append(dump_yaml(value, with_help, indent + 1))
        else:
            plain = (
                [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
                if isinstance(value, list)
                else value
            )
            rendered = yaml.safe_dump(plain, default_flow_style=True, width=10_000).strip()
            if rendered.endswith("\n..."):
                rendered = rendered[: -len("\n...")]
            rendered = rendered.removesuffix("...").strip()
            lines.append(f"{pad}{f.name}: {rendered}{comment}")
    return "\n".join(lines)


__all__ = [
    "Config",
    "Overrides",
    "option",
    "section",
    "TinyModelConfig",
    "LoraConfig",
    "ModelConfig",
    "SourceConfig",
    "DataConfig",
    "RolloutConfig",
    "TrainConfig",
    "LossConfig",
    "TaskConfig",
    "JudgeConfig",
    "IterateConfig",
    "StagesConfig",
    "LoggingConfig",
    "OutputConfig",
    "apply_overrides",
    "draws_online_samples",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "parse_override",
    "validate",
    "RENAMED_KEYS",
]
