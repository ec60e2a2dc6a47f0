"""Offline batch generation with the rollout pool: prompts in, one row per sample out (`spo-ray generate`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from spo_ray.config import RolloutConfig
from spo_ray.errors import UserError

_DEFAULTS = RolloutConfig()


def generate_rows(
    model: str | os.PathLike,
    prompts: list[Any],
    *,
    n: int = 2,
    max_tokens: int = _DEFAULTS.max_tokens,
    temperature: float = _DEFAULTS.temperature,
    top_p: float = _DEFAULTS.top_p,
    backend: str = _DEFAULTS.backend,
    num_actors: int = _DEFAULTS.num_actors,
    cpus_per_actor: float = _DEFAULTS.num_cpus_per_actor,
    seed: int = _DEFAULTS.seed,
    timeout_s: float = _DEFAULTS.timeout_s,
    batch_size: int = 16,
    max_model_len: int = 0,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> list[dict]:
    """Sample `n` responses per prompt (texts, chat message lists or token ids) with `model`; one dict per
    sample, in prompt order; also written to `out` as JSONL when given. A Ray runtime this starts is shut
    down at the end; a running one (the caller's) is joined and left running."""
    import ray
    from tqdm import tqdm

    from spo_ray.rollout import RolloutPool
    from spo_ray.rollout.pool import check_model_path

    check_model_path(model)
    if not prompts:
        raise UserError("no prompts to generate for")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, log_to_driver=verbose, configure_logging=verbose)
    engine_options = {"max_model_len": max_model_len} if max_model_len and backend == "vllm" else {}
    if backend == "vllm":  # nothing is synced here: vLLM CPU's packed weights generate 11-15% faster
        engine_options["cpu_weights"] = "packed"
    rows: list[dict] = []
    try:
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(
                RolloutPool(
                    model,
                    num_actors=num_actors,
                    backend=backend,
                    num_cpus_per_actor=cpus_per_actor,
                    seed=seed,
                    timeout_s=timeout_s,
                    **engine_options,
                )
            )
            sink = None  # rows are written as they arrive: an interrupted run keeps what it generated
            if out is not None:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                sink = stack.enter_context(Path(out).open("w", encoding="utf-8"))
            bar = stack.enter_context(tqdm(total=len(prompts), unit="prompt", disable=not progress))
            start = time.perf_counter()
            batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
            settings = {"n": n, "max_tokens": max_tokens, "temperature": temperature}
            pending = [pool.generate_async(batch, top_p=top_p, **settings) for batch in batches]
            for batch_index, request in enumerate(pending):
                for offset, samples in enumerate(request.result()):
                    for sample_index, sample in enumerate(samples):
                        row = {
                            "prompt_index": batch_index * batch_size + offset,
                            "sample_index": sample_index,
                            "prompt": sample.prompt,
                            "response": sample.text,
                            "prompt_token_ids": sample.prompt_token_ids,
                            "token_ids": sample.token_ids,
                            "logprobs": sample.logprobs,
                            "finish_reason": sample.finish_reason,
                            "policy_version": sample.policy_version,
                        }
                        rows.append(row)
                        if sink is not None:
                            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                    bar.update(1)
            seconds = time.perf_counter() - start
    finally:
        if started_ray:
            ray.shutdown()
    tokens = sum(len(row["token_ids"]) for row in rows)
    if progress:
        where = f" to {out}" if out is not None else ""
        print(
            f"wrote {len(rows)} samples for {len(prompts)} prompts{where} "
            f"({tokens} tokens in {seconds:.1f} s, {tokens / max(seconds, 1e-9):.0f} tokens/s)"
        )
    return rows
