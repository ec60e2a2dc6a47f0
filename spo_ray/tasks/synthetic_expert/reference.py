"""Supervised fitting of a reference model to a known distribution q over the synthetic task's S(x)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from spo_ray.eval.distributions import restrict_to_support, total_variation
from spo_ray.tasks.synthetic_expert.evaluate import (
    candidate_logprobs,
    encode_candidates,
    response_distribution,
)
from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask


def fit_reference(
    model_dir: str | os.PathLike,
    task: SyntheticExpertTask,
    out_dir: str | os.PathLike,
    steps: int = 200,
    lr: float = 5e-3,
    seed: int = 0,
) -> dict:
    """Fit the model in `model_dir` so that π(·|x) on S(x) is the task's q; save model + tokenizer to out_dir.

    Minimizes Σ_x Σ_k q[x][k]·(−log π(y_k|x)) (full batch, AdamW, warmup then cosine decay), whose minimum puts all
    mass on S and π restricted to S equal to q. Returns {tv_to_reference, mass_on_s, seconds, ...}.
    """
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    threads = torch.get_num_threads()
    # one thread: a tiny model gains nothing from more, and on a loaded machine (Ray workers, vLLM
    # engines) extra threads made 40 steps take 23 s instead of 0.6 s
    torch.set_num_threads(1)
    try:
        return _fit(model_dir, tokenizer, task, out_dir, steps, lr, seed, started)
    finally:
        torch.set_num_threads(threads)


def _fit(model_dir, tokenizer, task, out_dir, steps: int, lr: float, seed: int, started: float) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        model.train()
        batch = encode_candidates(tokenizer, task)
        q = task.reference_tensor().float()  # [P, K]
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)),
        )
        for _ in range(steps):
            logps = candidate_logprobs(model, batch)  # [P, K]
            loss = -(q * logps).sum(-1).mean()  # cross-entropy of q, per prompt
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    probs = response_distribution(model, tokenizer, task)  # [P, K]
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    tv = total_variation(restrict_to_support(probs), task.reference_tensor())
    metrics = {
        "tv_to_reference": tv.mean().item(),
        "max_tv_to_reference": tv.max().item(),
        "mass_on_s": probs.sum(-1).mean().item(),
        "min_mass_on_s": probs.sum(-1).min().item(),
        "final_loss": loss.item(),
        "steps": steps,
        "lr": lr,
        "seconds": time.perf_counter() - started,
    }
    (out / "fit_reference.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
