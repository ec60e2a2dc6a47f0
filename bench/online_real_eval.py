"""The one evaluator of bench_online_real.py: held-out accuracy, answer diversity and KL to the start model.

A model is sampled (`spo-ray generate`: vLLM on CPU, fixed seed) on the task's held-out test prompts; each sample is judged by
`spo_ray.tasks.arithmetic.problems.score`. KL(π‖π_0) of a sample is Σ_t KL(π(·|y_<t) ‖ π_0(·|y_<t)) over its
response tokens, exact over the vocabulary at each position; the mean over samples estimates the sequence KL
on the states π visits (at the sampling temperature).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spo_ray.losses import kl_per_position
from spo_ray.tasks.arithmetic import final_number, score


def bootstrap_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of `values` (one value per prompt), resampling prompts."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]]


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def sample(model_dir: str, prompts: list[str], spec: dict, work: Path):
    """spec["samples"] samples per prompt from `spo-ray generate` (vLLM on CPU, seeded): (prompt index,
    prompt ids, response ids, text) per sample."""
    work.mkdir(parents=True, exist_ok=True)
    prompts_file, out = work / "prompts.jsonl", work / "samples.jsonl"
    prompts_file.write_text(
        "".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in prompts)
    )
    command = [str(Path(sys.executable).parent / "spo-ray"), "generate", "--model", model_dir]
    command += ["--prompts", str(prompts_file), "--out", str(out), "--n", str(spec["samples"])]
    command += ["--max-tokens", str(spec["max_tokens"]), "--temperature", str(spec["temperature"])]
    command += ["--seed", str(spec["seed"]), "--max-model-len", "512"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    if done.returncode != 0:
        raise RuntimeError(f"spo-ray generate failed on {model_dir}: {done.stderr[-2000:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line]
    rows.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
    return [(r["prompt_index"], r["prompt_token_ids"], r["token_ids"], r["response"]) for r in rows]


@torch.no_grad()
def sample_hf(model_dir: str, prompts: list[str], spec: dict):
    """The same rows from transformers sampling in this process (tests: no Ray or vLLM start-up)."""
    from transformers import AutoTokenizer

    model, tokenizer = _load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    n, rows = spec["samples"], []
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(spec["seed"])
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=spec["temperature"],
        top_p=1.0,
        top_k=0,
        max_new_tokens=spec["max_tokens"],
        num_return_sequences=n,
        pad_token_id=tokenizer.pad_token_id,
    )
    width = batch["input_ids"].shape[1]
    for row, ids in enumerate(out):
        response = ids[width:].tolist()
        if tokenizer.eos_token_id in response:
            response = response[: response.index(tokenizer.eos_token_id) + 1]
        prompt_ids = batch["input_ids"][row // n][batch["attention_mask"][row // n].bool()].tolist()
        rows.append((row // n, prompt_ids, response, tokenizer.decode(response, skip_special_tokens=True)))
    return rows


@torch.no_grad()
def sequence_kl(policy, start, rows, batch: int = 8) -> list[float]:
    """Σ_t exact KL(π‖π_0) over each row's response tokens."""
    kls = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        seqs = [p + r for _, p, r, _ in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, s in enumerate(seqs):  # right padding: positions as in an unpadded run
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        per_position = kl_per_position(
            policy(input_ids=ids, attention_mask=mask).logits,
            start(input_ids=ids, attention_mask=mask).logits,
        )  # [B, T]
        for j, (_, p, r, _) in enumerate(chunk):  # the positions whose logits predict response tokens
            kls.append(float(per_position[j, len(p) - 1 : len(p) - 1 + len(r)].sum()))
    return kls


def evaluate_model(model_dir: str, start_dir: str, smoke: bool = False, spec: dict | None = None) -> dict:
    from online_real_runs import EVAL, SMOKE_EVAL, task

    spec = spec or (SMOKE_EVAL if smoke else EVAL)
    began = time.perf_counter()
    prompts = [p.text for p in task().splits["test"]][: spec["prompts"]]
    if spec.get("backend") == "hf":
        rows = sample_hf(model_dir, prompts, spec)
    else:
        rows = sample(model_dir, prompts, spec, Path(tempfile.mkdtemp(prefix="online_real_eval_")))
    policy = _load(model_dir)
    per_prompt: list[list[float]] = [[] for _ in prompts]
    answers: list[set] = [set() for _ in prompts]
    for index, _, _, text in rows:
        per_prompt[index].append(score(prompts[index], [text])[0])
        answers[index].add(final_number(text))
    accuracy = [sum(s) / len(s) for s in per_prompt]
    first = [
        rows[i * spec["samples"]] for i in range(min(spec["kl_samples"], len(prompts)))
    ]  # one per prompt
    kls = [0.0] * len(first) if model_dir == start_dir else sequence_kl(policy, _load(start_dir), first)
    return {
        "accuracy": sum(accuracy) / len(accuracy),
        "accuracy_ci95": bootstrap_ci(accuracy),
        "per_prompt_accuracy": accuracy,
        "pass_at_n": sum(max(s) for s in per_prompt) / len(per_prompt),
        "distinct_answers_per_prompt": sum(len(a) for a in answers) / len(answers),
        "no_number_fraction": sum(final_number(t) is None for *_, t in rows) / len(rows),
        "kl_to_start": sum(kls) / len(kls),
        "kl_samples": len(kls),
        "mean_response_tokens": sum(len(r) for _, _, r, _ in rows) / len(rows),
        "prompts": len(prompts),
        "samples_per_prompt": spec["samples"],
        "eval_seconds": round(time.perf_counter() - began, 1),
    }
