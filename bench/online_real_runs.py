"""The runs of bench_online_real.py (each in its own process) and its one evaluator.

spo_ray runs go through `spo_ray.api.iterate` on configs/arithmetic_smollm2.yaml with the budget below; the
TRL runs train the same LoRA on the same prompts with `arithmetic_reward`, the task's judge as a TRL reward
function. Every run writes DIR/NAME/run.json: wall time, generated tokens and steps at start / round 1 /
the end (`points`, with the model each point is evaluated on), and its own training logs' figures.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from common import REPO

from spo_ray.tasks.arithmetic import ArithmeticTask, score

CONFIG = REPO / "configs" / "arithmetic_smollm2.yaml"
BUDGET = {  # every run: 2 rounds/generation batches x 8 prompts x 8 samples, 2 x 4 optimizer steps (~45 min in all)
    "rounds": 2,
    "prompts_per_round": 8,
    "candidates": 8,
    "steps_per_round": 4,
    "max_tokens": 64,
    "temperature": 0.7,
    "lr": 2e-4,
    "lora_r": 8,
    "lora_alpha": 16,
    "kl_coef": 0.05,  # spo_ray's global KL weight; GRPO's beta
    "dpo_beta": 0.1,  # spo_ray's DPO beta and TRL OnlineDPO's beta
}
SMOKE = {**BUDGET, "rounds": 1, "prompts_per_round": 8, "candidates": 4, "steps_per_round": 1}
EVAL = {"prompts": 64, "samples": 2, "kl_samples": 32, "temperature": 0.7, "max_tokens": 64, "seed": 1234}
SMOKE_EVAL = {**EVAL, "prompts": 2, "samples": 2, "kl_samples": 2}
TASK = {"seed": 0, "num_train": 256, "num_heldout": 64, "operations": 1}  # as in the config
RUNS = {
    "spo_a0.5": {"kind": "spo_ray", "loss": {"name": "spo", "alpha": 0.5}},
    "spo_a2": {"kind": "spo_ray", "loss": {"name": "spo", "alpha": 2.0}},
    "dpo": {"kind": "spo_ray", "loss": {"name": "dpo", "beta": BUDGET["dpo_beta"]}},
    "trl_grpo": {"kind": "trl_grpo"},
    "trl_online_dpo": {"kind": "trl_online_dpo"},
}
DEFAULT_RUNS = tuple(RUNS)
RUNS["trl_grpo_vllm"] = {
    "kind": "trl_grpo",
    "use_vllm": True,
}  # TRL's own vLLM (colocate): tried, see RESULTS.md


def task() -> ArithmeticTask:
    return ArithmeticTask.build(TASK["seed"], TASK["num_train"], TASK["num_heldout"], TASK["operations"])


def round_prompts(budget: dict, seed: int = 0) -> list[str]:
    """The prompts spo_ray's rounds draw (iterate.seed, rounds.py's rng), round after round: TRL trains on them."""
    train = [p.text for p in task().splits["train"]]
    chosen = []
    for number in range(1, budget["rounds"] + 1):
        rng = random.Random(f"{seed}:round:{number}")
        chosen += [train[i] for i in rng.sample(range(len(train)), budget["prompts_per_round"])]
    return chosen


def _text(value) -> str:
    """A TRL prompt or completion as text: a string, or the last message's content (conversational)."""
    return value if isinstance(value, str) else value[-1]["content"]


class ArithmeticReward:
    """The task's judge as a TRL reward function (1.0 right final number, else 0.0); counts generated tokens."""

    __name__ = "arithmetic_reward"

    def __init__(self, eos_token_id: int | None = None):
        self.tokens = 0
        self.samples = 0
        self.eos_token_id = eos_token_id

    def generated(self, ids) -> int:
        """Tokens generated: up to the first eos, which counts (OnlineDPOTrainer pads its ids with eos)."""
        ids = list(ids)
        return ids.index(self.eos_token_id) + 1 if self.eos_token_id in ids else len(ids)

    def __call__(self, prompts, completions, completion_ids=None, **_) -> list[float]:
        if completion_ids is not None:
            self.tokens += sum(self.generated(ids) for ids in completion_ids)
        self.samples += len(completions)
        return [score(_text(p), [_text(c)])[0] for p, c in zip(prompts, completions)]


arithmetic_reward = ArithmeticReward()


# -- runs ------------------------------------------------------------------------------------------------


def run_folder(out: Path, name: str, seed: int) -> Path:
    """Where one run of one seed keeps its files (spo_ray's rounds resume from FOLDER/work; TRL's overwrite)."""
    return out / f"seed_{seed}" / name


def run_child(name: str, out: Path, model: str, smoke: bool, seed: int = 0) -> None:
    """One run with one seed: the prompts each round draws, the samples, the data order and TRL's seed."""
    started = time.perf_counter()
    spec, budget = RUNS[name], SMOKE if smoke else BUDGET
    folder = run_folder(out, name, seed)
    runner = {"spo_ray": spo_ray_run, "trl_grpo": trl_grpo_run, "trl_online_dpo": trl_online_dpo_run}
    result = runner[spec["kind"]](spec, folder, model, budget, started, seed)
    result.update(name=name, budget=budget, kind=spec["kind"], seed=seed)
    (folder / "run.json").write_text(json.dumps(result, indent=1))


def spo_ray_run(spec: dict, folder: Path, model: str, budget: dict, started: float, seed: int) -> dict:
    from transformers import AutoTokenizer

    from spo_ray.api import iterate

    loss = {f"loss.{k}": v for k, v in spec["loss"].items()}
    overrides = {
        "model.path": model,
        "iterate.rounds": budget["rounds"],
        "iterate.prompts_per_round": budget["prompts_per_round"],
        "iterate.candidates_per_prompt": budget["candidates"],
        "iterate.steps_per_round": budget["steps_per_round"],
        "iterate.max_tokens": budget["max_tokens"],
        "iterate.temperature": budget["temperature"],
        "iterate.eval_prompts": 16,  # its own per-round eval kept cheap: the bench's evaluator scores the models
        "iterate.eval_samples": 1,
        "train.lr": budget["lr"],
        "train.batch_size": 4 if budget["steps_per_round"] > 1 else 1,
        "loss.kl_coef": budget["kl_coef"],
        "iterate.seed": seed,
        "train.seed": seed,
        "rollout.seed": seed,
        # the KL samples of step k drawn after step k-1's sync: rollout_logp_gap is then vLLM-vs-trainer numerics
        # alone (with the default overlap it also holds one step of policy change, policy_lag 1)
        "rollout.overlap": False,
        **loss,
    }
    summary = iterate(str(CONFIG), overrides=overrides, output_dir=str(folder / "work")).summary
    end = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(model)
    rounds = summary["rounds"][1:]
    points = [{"label": "start", "model": None, "seconds": 0.0, "tokens": 0, "samples": 0, "steps": 0}]
    elapsed = end - sum(r["round_seconds"] for r in rounds)  # start-up and round 0 (its eval)
    tokens = samples = steps = 0
    gaps, kl_tokens, lags = [], [], []
    for r in rounds:
        folder_r = folder / "work" / "rounds" / f"round_{r['round']}"
        for line in (folder_r / "candidates.jsonl").read_text().splitlines():
            row = json.loads(line)
            ids = tokenizer(row["responses"], add_special_tokens=False)["input_ids"]
            tokens += sum(len(i) + (f == "stop") for i, f in zip(ids, row["finish_reasons"]))
            samples += len(row["responses"])
        metrics = [
            json.loads(line) for line in (folder_r / "train" / "metrics.jsonl").read_text().splitlines()
        ]
        metrics = [m for m in metrics if "rollout_logp_gap" in m]
        tokens += int(sum(m.get("sample_tokens", 0) for m in metrics))  # the KL term's online samples
        samples += sum(2 for _ in metrics)  # rollout.prompts_per_step x samples_per_prompt
        gaps.append([m["rollout_logp_gap"] for m in metrics])
        lags.append([m.get("policy_lag") for m in metrics])
        kl_tokens.append([m.get("kl_token") for m in metrics])
        steps += r["train_steps"]
        elapsed += r["round_seconds"]
        points.append(
            {
                "label": f"round {r['round']}",
                "model": r["model"],
                "seconds": round(elapsed, 1),
                "tokens": tokens,
                "samples": samples,
                "steps": steps,
                "examples": r["examples"],
                "skipped": r["skipped"],
                "iterate_expected_reward": r["expected_reward"],
            }
        )
    return {
        "wall_seconds": round(end, 1),
        "points": points,
        "rollout_logp_gap_per_round": gaps,
        "policy_lag_per_round": lags,
        "train_kl_token_per_round": kl_tokens,
        "generation": "vLLM (spo_ray rollout pool, CPU)",
    }


def _lora():
    from peft import LoraConfig

    from spo_ray.config import Config

    targets = list(Config().model.lora.target_modules)
    return LoraConfig(
        r=BUDGET["lora_r"], lora_alpha=BUDGET["lora_alpha"], lora_dropout=0.0, target_modules=targets
    )


def _dataset(budget: dict, seed: int, repeat: int = 1):
    from datasets import Dataset

    prompts = round_prompts(budget, seed) * repeat
    return Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])


class _Clock:
    """A TRL callback: at the end of each round's worth of steps, time, tokens and the adapter so far."""

    def __init__(self, folder: Path, budget: dict, started: float, reward: ArithmeticReward):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % budget["steps_per_round"] == 0:
                    clock.mark(state.global_step, model)

        self.callback = Callback()
        self.folder, self.budget, self.started, self.reward = folder, budget, started, reward
        self.points = [
            {"label": "start", "model": None, "seconds": 0.0, "tokens": 0, "samples": 0, "steps": 0}
        ]
        self.adapters: list[Path] = []

    def mark(self, step: int, model) -> None:
        seconds = time.perf_counter() - self.started
        adapter = self.folder / "work" / f"adapter_step_{step}"
        model.save_pretrained(adapter)
        self.adapters.append(adapter)
        number = step // self.budget["steps_per_round"]
        self.points.append(
            {
                "label": f"round {number}",
                "model": None,
                "seconds": round(seconds, 1),
                "tokens": self.reward.tokens,
                "samples": self.reward.samples,
                "steps": step,
            }
        )

    def merge_all(self, model_dir: str) -> None:
        """The last adapter merged into the start model, as an HF folder the evaluator loads."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for adapter, point in zip(self.adapters, self.points[1:]):
            point["model"] = str(adapter)  # the intermediate rounds: adapters only (not evaluated)
        point = self.points[-1]
        point["model"] = str(self.folder / "work" / "final")
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        merged = PeftModel.from_pretrained(base, self.adapters[-1]).merge_and_unload()
        merged.save_pretrained(point["model"])
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(point["model"])


def _train_args(budget: dict, folder: Path, seed: int) -> dict:
    return {
        "output_dir": str(folder / "work" / "trl"),
        "learning_rate": budget["lr"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,  # spo_ray's first step runs at the full lr too (HF warmup 1 would make it 0)
        "max_steps": budget["rounds"] * budget["steps_per_round"],
        "temperature": budget["temperature"],
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": seed,
        "dataloader_num_workers": 0,
        # TRL's defaults are bf16 autocast and gradient checkpointing, both slower on CPU; with checkpointing on,
        # OnlineDPOTrainer also generates without a KV cache (use_cache=False)
        "bf16": False,
        "gradient_checkpointing": False,
    }


def trl_grpo_run(spec: dict, folder: Path, model: str, budget: dict, started: float, seed: int) -> dict:
    """GRPOTrainer: one generation batch of 16 prompts x 8 per round, split into 8 optimizer steps."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    reward = ArithmeticReward(tokenizer.eos_token_id)
    per_step = budget["prompts_per_round"] * budget["candidates"] // budget["steps_per_round"]
    args = GRPOConfig(
        **_train_args(budget, folder, seed),
        per_device_train_batch_size=per_step,
        num_generations=budget["candidates"],
        steps_per_generation=budget["steps_per_round"],
        max_completion_length=budget["max_tokens"],
        top_k=0,
        beta=budget["kl_coef"],
        use_vllm=bool(spec.get("use_vllm")),
        # colocate on CPU: SmolLM2's 8,192 positions overflow a small CPU KV cache (spo_ray's cpu_max_model_len)
        **({"vllm_mode": "colocate", "vllm_max_model_length": 512} if spec.get("use_vllm") else {}),
    )
    clock = _Clock(folder, budget, started, reward)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=_dataset(budget, seed),
        processing_class=tokenizer,
        peft_config=_lora(),
        callbacks=[clock.callback],
    )
    return _train(
        trainer, clock, model, started, "vLLM colocate" if spec.get("use_vllm") else "transformers generate"
    )


def trl_online_dpo_run(spec: dict, folder: Path, model: str, budget: dict, started: float, seed: int) -> dict:
    """OnlineDPOTrainer: 2 samples per prompt, ranked by the reward; 8 prompts per step (16 samples, as GRPO)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    reward = ArithmeticReward(tokenizer.eos_token_id)
    per_step = budget["prompts_per_round"] * budget["candidates"] // budget["steps_per_round"] // 2
    args = OnlineDPOConfig(
        **_train_args(budget, folder, seed),
        per_device_train_batch_size=per_step,
        max_new_tokens=budget["max_tokens"],
        top_k=0,
        beta=budget["dpo_beta"],
    )
    clock = _Clock(folder, budget, started, reward)
    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        reward_funcs=reward,
        args=args,
        train_dataset=_dataset(budget, seed, repeat=budget["candidates"] // 2),  # 2 samples per prompt
        processing_class=tokenizer,
        peft_config=_lora(),
        callbacks=[clock.callback],
    )
    return _train(trainer, clock, model, started, "transformers generate")


def _train(trainer, clock, model: str, started: float, generation: str) -> dict:
    """Run a TRL trainer to the end of its budget; its wall time from `started`, and the clock's points."""
    trainer.train()
    end = time.perf_counter() - started
    clock.merge_all(model)
    return {
        "wall_seconds": round(end, 1),
        "points": clock.points,
        "log_history": trainer.state.log_history,
        "generation": generation,
    }


from online_real_eval import evaluate_model  # noqa: E402  (re-exported for bench_online_real.py)

__all__ = ["DEFAULT_RUNS", "RUNS", "arithmetic_reward", "evaluate_model", "run_child", "run_folder"]
