"""`task:`, `judge:` and `iterate:`: built-in tasks and iterative rounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spo_ray.config.fields import option


@dataclass
class TaskConfig:
    name: Literal["none", "synthetic_expert", "arithmetic"] = option(
        "none",
        "built-in task that writes its own data and reference: 'synthetic_expert' (known Bradley-Terry expert), "
        "'arithmetic' (seeded word problems with an exact judge, for `spo-ray iterate`)",
    )
    num_prompts: int = option(8, "synthetic expert: prompts; arithmetic: training prompts", ge=1)
    num_candidates: int = option(5, "synthetic expert: candidate responses per prompt (the set S)", ge=2)
    num_pairs: int = option(16000, "synthetic expert: Bradley-Terry preference pairs to draw", ge=1)
    seed: int = option(
        0, "synthetic expert: seed of rewards, reference distribution and pairs; arithmetic: of the problems"
    )
    reference_fit_steps: int = option(
        300, "synthetic expert: steps fitting the tiny model to the reference", ge=1
    )
    num_heldout: int = option(64, "arithmetic: prompts in each held-out split (validation, test)", ge=1)
    operations: int = option(2, "arithmetic: add/subtract steps per problem (the difficulty)", ge=1)


@dataclass
class JudgeConfig:
    name: Literal["task", "synthetic_expert", "reward_model", "llm_judge", "python"] = option(
        "task",
        "preference oracle of iterative rounds: 'task' (the built-in task's exact judge; its name, e.g. "
        "synthetic_expert, says the same), a reward model, an LLM judge, or a Python callable",
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
        "",
        "prompts of the rounds (text, one per line, or JSONL with 'prompt'); empty: the task's or data.reg_prompts_file",
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
        8,
        "fixed prompts for the per-round evaluation (first k of iterate.eval_prompts_file, else of the task's "
        "held-out prompts, else of the prompt set)",
        ge=1,
    )
    eval_prompts_file: str = option(
        "", "held-out prompts of the per-round evaluation (as iterate.prompts_file); empty: see eval_prompts"
    )
    eval_samples: int = option(4, "samples per eval prompt from each round's policy", ge=1)
    seed: int = option(0, "seed of prompt sampling, candidate sampling and sampled labels")


@dataclass
class StagesConfig:
    dimensions: list[str] = option(
        [],
        "spo-ray stages (Sequential PO): the preference dimensions in training order, e.g. [helpful, harmless]; "
        "stage k trains on the rows labelled dimensions[k-1] (data.dimension), from stage k-1's final model",
    )
    steps: list[int] = option(
        [], "optimizer steps of each stage, one per dimension; empty: train.max_steps for every stage"
    )
