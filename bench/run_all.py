"""Run every benchmark, then write bench/RESULTS.md, bench/results.json and the PNG plots.

`make bench` runs `python bench/run_all.py`. Sections (each a child process, so Ray, vLLM and torch
start fresh and free their memory): train (vs TRL and a bare PyTorch step, tiny and SmolLM2+LoRA),
ray (real Ray Train runs, 1 vs 2 workers), online (online SPO overhead), rollout (bench_rollout.py:
vLLM vs HF generation, weight sync vs memcpy), quality (the synthetic expert table), data
(bench_data.py), kl_memory (bench_kl_memory.py: peak memory of the global-KL term, full logits vs
chunked, SmolLM2), seqpo (bench_seqpo.py: Sequential PO's two stages vs the closed-form optimum),
online_real (bench_online_real.py: SmolLM2+LoRA on the arithmetic task, spo_ray's iterative SPO/DPO vs
TRL's GRPOTrainer and OnlineDPOTrainer; about an hour on its own); the
report also carries cost_model.py's paper estimate for a 7–8B model on 8 GPUs. `--only a,b` runs some
sections and rebuilds the report from the others' last JSON in bench/out/; `--report` only rebuilds the
report. Budget: about 30 minutes on 2 free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_vs_trl  # noqa: E402
from common import BENCH_DIR, OUT, machine, read_json, run_python, write_json  # noqa: E402
from cost_model import report as cost_model_report  # noqa: E402
from online_real_report import make_plot as online_real_plot  # noqa: E402
from online_real_report import results_keys as online_real_results  # noqa: E402
from online_real_report import section as online_real_section  # noqa: E402

SECTIONS = ("train", "ray", "online", "rollout", "quality", "data", "kl_memory", "seqpo", "online_real")
QUALITY_STEPS = 200


def threads_for_timing(requested: str) -> int:
    """Torch threads for the in-process trainer timings: all cores on an idle machine, one when other
    work already occupies the cores (oversubscribed OpenMP threads then wait on each other)."""
    if requested != "auto":
        return int(requested)
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > cores - 0.5 else cores


def run_section(name: str, args: argparse.Namespace, log: dict) -> None:
    quick = args.quick
    started = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)
    try:
        if name == "train":
            threads = threads_for_timing(args.threads)
            log["train_threads"] = threads
            tiny = ["--model", "tiny", "--reps", "3" if quick else "5", "--steps", "6" if quick else "8"]
            run_python(BENCH_DIR / "bench_train.py", [*tiny, "--threads", str(threads)])
            smol = ["--model", "smollm2", "--reps", "2" if quick else "3", "--steps", "3"]
            run_python(BENCH_DIR / "bench_train.py", [*smol, "--threads", str(threads)])
        elif name == "ray":
            cpus = str(log.get("train_threads") or threads_for_timing(args.threads))  # as section train's
            steps = "20" if quick else "40"
            ray_args = [
                "--only",
                "ray",
                "--steps",
                steps,
                "--cpus-per-worker",
                cpus,
                "--out",
                str(OUT / "ray.json"),
            ]
            run_python(BENCH_DIR / "bench_online.py", ray_args)
        elif name == "online":
            run_python(
                BENCH_DIR / "bench_online.py",
                ["--only", "online", "--steps", "30" if quick else "60", "--out", str(OUT / "online.json")],
            )
        elif name == "rollout":
            rollout = [
                "--models",
                "tiny,mid,smollm2",
                "--repeats",
                "1" if quick else "2",
                "--max-tokens",
                "32",
            ]
            run_python(BENCH_DIR / "bench_rollout.py", [*rollout, "--out", str(OUT / "rollout.json")])
        elif name == "quality":
            # the config's data, batch and lr for every method; fewer steps than its 400 to fit the budget
            steps = "120" if quick else str(QUALITY_STEPS)
            run_python(
                BENCH_DIR / "bench_quality.py",
                ["--set", f"train.max_steps={steps}", "--out", str(OUT / "quality.json")],
            )
        elif name == "data":
            sizes = (
                ["--rows", "20000", "--small", "5000"] if quick else ["--rows", "50000", "--small", "5000"]
            )
            vs_trl = [
                "--vs-trl",
                "--vs-trl-rows",
                "10000" if quick else "50000",
                "--rounds",
                "1",  # about 3 minutes on 2 idle cores: make bench stays within its 30 minutes
            ]
            run_python(BENCH_DIR / "bench_data.py", [*sizes, *vs_trl, "--out", str(OUT / "data.json")])
        elif name == "kl_memory":
            threads = str(log.get("train_threads") or threads_for_timing(args.threads))
            run_python(
                BENCH_DIR / "bench_kl_memory.py",
                ["--reps", "1" if quick else "2", "--threads", threads, "--out", str(OUT / "kl_memory.json")],
            )
        elif name == "seqpo":
            steps = "100" if quick else str(QUALITY_STEPS)
            run_python(BENCH_DIR / "bench_seqpo.py", ["--steps", steps, "--out", str(OUT / "seqpo.json")])
        elif name == "online_real":  # SmolLM2 + LoRA vs TRL's online trainers, 2 seeds (~1 h)
            run_python(BENCH_DIR / "bench_online_real.py", ["--out", str(OUT / "online_real")])
        log[name] = {"ok": True, "seconds": round(time.perf_counter() - started, 1)}
        log[name]["load_average_1m"] = [load_at_start, round(os.getloadavg()[0], 2)]  # at start, at end
        log[name]["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    except Exception as exc:  # one broken section must not lose the others' numbers
        log[name] = {
            "ok": False,
            "seconds": round(time.perf_counter() - started, 1),
            "error": str(exc)[-2000:],
        }
    print(f"[{name}] {json.dumps(log[name])[:300]}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Report


def _get(data, *keys, default=None):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def headline(train: dict, ray_runs: dict, online: dict, rollout: dict, quality: dict) -> dict:
    """results.json: the issue's six keys first (tiny model for the trainer ratios), then the rest."""
    tiny, smol = train.get("tiny") or {}, train.get("smollm2") or {}
    ratios = _get(tiny, "ratios", default={})
    gen = {r["model"]: {} for r in _get(rollout, "results", default=[])}
    for r in _get(rollout, "results", default=[]):
        gen[r["model"]][r["backend"]] = r
    gen_ratio = {
        m: b["vllm"]["tokens_per_s"] / b["hf"]["tokens_per_s"]
        for m, b in gen.items()
        if "vllm" in b and "hf" in b
    }
    biggest = next((m for m in ("smollm2", "mid", "tiny") if m in gen and "vllm" in gen[m]), None)
    out = {
        "dpo_pairs_per_s_ratio_vs_trl": _get(ratios, "dpo_pairs_per_s_ratio_vs_trl", "median"),
        "spo_pairs_per_s_ratio_vs_trl_dpo": _get(ratios, "spo_pairs_per_s_ratio_vs_trl_dpo", "median"),
        "online_overhead_ratio": _get(online, "online_overhead_ratio"),
        "online_overhead_vs_compute_floor": _get(online, "online_overhead_vs_compute_floor"),
        "vllm_vs_hf_tokens_per_s_ratio": gen_ratio.get("smollm2", gen_ratio.get(biggest)),
        "sync_mb_per_s": _get(gen, biggest, "vllm", "sync_mb_per_s"),
        "memcpy_mb_per_s": _get(gen, biggest, "vllm", "memcpy_mb_per_s"),
        "notes": {
            "trainer_ratios_model": "tiny (590k-parameter Llama), medians over interleaved steps",
            "generation_and_sync_model": biggest,
        },
        "smollm2_lora": {
            "dpo_pairs_per_s_ratio_vs_trl": _get(smol, "ratios", "dpo_pairs_per_s_ratio_vs_trl", "median"),
            "spo_pairs_per_s_ratio_vs_trl_dpo": _get(
                smol, "ratios", "spo_pairs_per_s_ratio_vs_trl_dpo", "median"
            ),
            "spo_step_over_bare_same_layout": _get(
                smol, "ratios", "spo_step_over_bare_same_layout", "median"
            ),
            "spo_step_over_bare_padded": _get(smol, "ratios", "spo_step_over_bare_padded", "median"),
        },
        "tiny": {
            "spo_step_over_bare_same_layout": _get(ratios, "spo_step_over_bare_same_layout", "median"),
            "spo_step_over_bare_padded": _get(ratios, "spo_step_over_bare_padded", "median"),
            "dpo_loss_abs_diff_vs_trl": _get(tiny, "dpo_parity", "abs_diff"),
        },
        "online_overhead_ratio_no_overlap": _get(online, "online_overhead_ratio_no_overlap"),
        "vllm_vs_hf_tokens_per_s_ratio_by_model": gen_ratio,
        "ray_train_pairs_per_s": {
            k: _get(v, "pairs_per_s") for k, v in ray_runs.items() if isinstance(v, dict)
        },
        "scaling_2_workers_over_1": _get(ray_runs, "scaling_2w_over_1w_pairs_per_s"),
        "quality_tv_to_target": {k: v["tv_to_target"] for k, v in _get(quality, "rows", default={}).items()},
        "quality_degree_acc_held_out": {  # loss.sspo_lambda rows: the degree head on held-out rows
            k: v["degree_acc_held_out"]
            for k, v in _get(quality, "rows", default={}).items()
            if v.get("degree_acc_held_out") is not None
        },
    }
    return out


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def train_table(train: dict) -> list[str]:
    lines = []
    for model in ("tiny", "smollm2"):
        r = train.get(model)
        if not r:
            continue
        if "skipped" in r:
            lines += [f"**{model}**: skipped ({r['skipped']})", ""]
            continue
        tokens = r["tokens"]
        lora = " + LoRA r=8 (all linear layers)" if r["lora"] else ""
        lines += [
            f"**{model}{lora}** — batch {r['batch_pairs']} pairs, max_length {r['max_length']}, fp32, "
            f"{r['threads']} torch thread{'s' if r['threads'] > 1 else ' (the machine was busy, see --threads)'}; {r['reps']} repetitions × {r['steps'] - 1} timed steps "
            f"(first step of each repetition dropped); per step {tokens['real_tokens_per_step']:.0f} real tokens, "
            f"{tokens['padded_tokens_per_step']:.0f} padded ({tokens['padding_fraction']:.0%} padding), "
            f"{tokens['response_tokens_per_step']:.0f} response tokens — identical token ids for every trainer. "
            + (
                f"spo_ray's shared-prompt layout holds {tokens['spo_ray_layout_real_tokens_per_step']:.0f} real tokens "
                f"({tokens['spo_ray_layout_tokens_per_step']:.0f} with padding) and runs the LM head on the "
                f"{tokens['response_tokens_per_step']:.0f} response positions only."
                if "spo_ray_layout_tokens_per_step" in tokens
                else ""
            ),
            "",
            "| trainer | median s/step | min–max | pairs/s | TRL s/step ÷ this |",
            "|---|---|---|---|---|",
        ]
        names = {
            "trl_dpo": "TRL `DPOTrainer` (DPO)",
            "spo_ray_dpo": "spo_ray step, DPO loss",
            "spo_ray_spo": "spo_ray step, SPO loss",
            "bare_padded": "bare PyTorch fwd+bwd+AdamW, padded (floor of a padded step)",
            "bare_spo_ray_layout": "bare PyTorch fwd+bwd+AdamW, spo_ray's layout (floor of spo_ray's step)",
        }
        trl = r["step_seconds"]["trl_dpo"]["median"]
        for key, label in names.items():
            s = r["step_seconds"][key]
            lines.append(
                f"| {label} | {s['median']:.3f} | {s['min']:.3f}–{s['max']:.3f} | {r['pairs_per_s'][key]:.2f} | "
                f"{trl / s['median']:.2f}× |"
            )
        ratio = r["ratios"]
        lines += [
            "",
            "| ratio (per step, same batch, back to back; median [min–max] over "
            f"{ratio['dpo_pairs_per_s_ratio_vs_trl']['n']} steps) | value | goal |",
            "|---|---|---|",
            f"| spo_ray DPO pairs/s ÷ TRL DPO pairs/s | {_ratio(ratio['dpo_pairs_per_s_ratio_vs_trl'])} | ≥ 1.3 |",
            f"| spo_ray SPO pairs/s ÷ TRL DPO pairs/s | {_ratio(ratio['spo_pairs_per_s_ratio_vs_trl_dpo'])} | ≥ 1.8 |",
            f"| spo_ray SPO step ÷ bare step, same layout | {_ratio(ratio['spo_step_over_bare_same_layout'])} | ≤ 1.1 |",
            f"| spo_ray SPO step ÷ bare step, padded | {_ratio(ratio['spo_step_over_bare_padded'])} | ≤ 1.1 |",
            f"| spo_ray DPO step ÷ bare step, padded | {_ratio(ratio['dpo_step_over_bare_padded'])} | — |",
            f"| TRL step ÷ bare step, padded | {_ratio(ratio['trl_step_over_bare_padded'])} | — |",
            "",
        ]
        if "dpo_parity" in r:
            p = r["dpo_parity"]
            lines += [
                f"DPO loss on one fixed batch (policy ≠ reference): TRL {p['trl_loss']:.8f}, spo_ray "
                f"{p['spo_ray_loss']:.8f} (packed batch: {p['spo_ray_loss_packed']:.8f}); |diff| = "
                f"{p['abs_diff']:.1e} ({'within' if p['ok'] else 'NOT within'} 1e-5).",
                "",
            ]
    return lines


PROFILE_NOTES = [
    "**Where the time goes (torch.profiler, tiny model, 1 thread).** TRL 1.16's step: its fused, chunked "
    "LM head (`ChunkedLogProbFunction`, forward + backward) is about half of the step: on CPU (no Triton) it "
    "scores every position of the padded [2B, T] batch — prompt and padding included — and also computes "
    "entropy, mean logit and top-1 for its metrics; on top come the reference forward and the padding "
    "(30% of the tiny batch's tokens, 15% of SmolLM2's). spo_ray's step before this benchmark "
    "(one padded forward over chosen + rejected, full [2B, T, V] logits, log-softmax over every position) was "
    "already at the padded floor; three changes in `spo_ray/training/step.py` took it below it: (1) each "
    "prompt is run once, its responses follow it in the same row behind a 4-D attention mask (response j "
    "sees the prompt and its own prefix; positions continue from the prompt), so prompt tokens are not "
    "duplicated across chosen and rejected; (2) the LM head and log-softmax run only at the positions that "
    "predict a response token (a forward pre-hook on the output embedding hands it those hidden states; "
    "the forward still goes through the model, so DDP and PEFT see a normal call); (3) no reference forward "
    "for SPO (its preference term needs none) and, for DPO, the reference forward uses the same compact "
    "layout (or none at all with `train.precompute_ref_logps`). Tried and measured slower on CPU: the packed "
    "layout (`data.packing=true`): with SDPA, transformers builds a [total, total] block-diagonal mask, so "
    "attention grows with the square of the whole batch (tiny model: packed fwd+bwd 1.5–2× the padded one). "
    "The remaining cost of spo_ray's step over the bare loop on its own layout (collate, metrics, "
    "clipping, scheduler) is the `÷ bare, same layout` ratio above.",
    "",
]


def _ratio(r: dict) -> str:
    return f"**{r['median']:.2f}** [{r['min']:.2f}–{r['max']:.2f}]"


def report(log: dict) -> None:
    train = {m: read_json(OUT / f"train_{m}.json") for m in ("tiny", "smollm2")}
    ray_runs = _get(read_json(OUT / "ray.json"), "ray", default={}) or {}
    online = _get(read_json(OUT / "online.json"), "online", default={}) or {}
    rollout = read_json(OUT / "rollout.json") or {}
    quality = read_json(OUT / "quality.json") or {}
    data = read_json(OUT / "data.json") or {}
    kl_memory = read_json(OUT / "kl_memory.json") or {}
    seqpo = read_json(OUT / "seqpo.json") or {}
    online_real = read_json(OUT / "online_real" / "results.json") or {}
    results = headline(train, ray_runs, online, rollout, quality)
    results["kl_peak_memory_ratio"] = kl_memory.get("kl_peak_memory_ratio")
    lora_sync = _get(rollout, "lora", "smollm2", default=None)  # bench_rollout.py --lora-models
    results["lora_sync_bytes_ratio"] = _get(lora_sync, "lora_sync_bytes_ratio")
    results["lora_sync"] = {"model": "smollm2", **lora_sync} if lora_sync else None
    results["sync_over_memcpy"] = (
        _get(results, "sync_mb_per_s") and results["sync_mb_per_s"] / results["memcpy_mb_per_s"]
    )
    results["kl_memory"] = (
        {k: kl_memory.get(k) for k in ("model", "settings", "check")} if kl_memory else None
    )
    results.update(seqpo_results(seqpo))
    results.update(online_real_results(online_real))
    # bench_data.py --scale (needs an older checkout, so not a section): keep its last figures
    scale = read_json(OUT / "data_scale.json") or read_json(BENCH_DIR / "results.json") or {}
    results.update({k: scale.get(k) for k in ("data_read_amplification", "resume_seconds_ratio")})
    # bench_data.py --vs-trl; its --large N memory (run once by hand) is kept from the last results.json
    if data.get("vs_trl"):
        data["vs_trl"] = data_vs_trl.keep_large(data["vs_trl"], read_json(BENCH_DIR / "results.json") or {})
        results.update(data_vs_trl.results_keys(data["vs_trl"]))
    context = machine()
    results["machine"] = context
    results["run"] = log
    write_json(BENCH_DIR / "results.json", results)
    plots = make_plots(train, online, rollout)

    lines = [
        "# spo_ray benchmarks",
        "",
        f"Measured {context['date']} on {context['cpu']}, {context['cores']} cores, {context['memory_gb']} GB. "
        f"The machine was shared with other work (1-minute load average during the sections: {loads(log)}), so "
        "absolute times are noisy; every figure below is a ratio or a median of interleaved repetitions. "
        f"torch {context['torch']}, transformers {context['transformers']}, TRL {context['trl']}, peft {context['peft']}, "
        f"Ray {context['ray']}, vLLM {context['vllm']}. Reproduce: `make bench` (or `python bench/run_all.py "
        "[--quick] [--only train,ray,online,rollout,quality,data]`); raw numbers in `bench/out/*.json` (not committed).",
        "",
        "## Headline",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key in (
        "dpo_pairs_per_s_ratio_vs_trl",
        "spo_pairs_per_s_ratio_vs_trl_dpo",
        "online_overhead_ratio",
        "online_overhead_vs_compute_floor",
        "vllm_vs_hf_tokens_per_s_ratio",
        "sync_mb_per_s",
        "memcpy_mb_per_s",
        "kl_peak_memory_ratio",
        "lora_sync_bytes_ratio",
    ):
        lines.append(f"| `{key}` | {fmt(results[key], 2)} |")
    lines += ["", "## 1. Training throughput vs TRL", ""]
    lines += [
        "One process holds every trainer on the same weights and the same token ids (TRL tokenizes the "
        "conversational rows with the chat template; spo_ray and the bare step receive exactly those ids, "
        "batch for batch). Per training step k, TRL's `DPOTrainer.train()` runs step k (timed between "
        "consecutive `on_step_end` callbacks: data loading, forward, backward, optimizer, metrics, logging), "
        "then, inside that callback and outside TRL's timing, every other trainer runs the same batch k. "
        "TRL runs fp32 with `gradient_checkpointing=False` (its defaults are bf16 autocast and checkpointing, "
        "both slower on CPU) and a sequential sampler; spo_ray runs what a Ray Train worker runs per step "
        "(collate → `compute_step` → backward → clip → AdamW → schedule).",
        "",
    ]
    lines += train_table(train)
    lines += PROFILE_NOTES
    lines += ray_section(ray_runs, train)
    lines += online_section(online)
    lines += rollout_section(rollout)
    lines += quality_section(quality)
    lines += data_section(data)
    lines += kl_memory_section(kl_memory)
    lines += seqpo_section(seqpo)
    plot = online_real_plot(online_real, BENCH_DIR / "online_real.png")
    lines += online_real_section(online_real, plot.name if plot else None)
    lines += cost_model_report() + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += quality_plots(quality)
    lines += ["", "## Run log", "", "```", json.dumps(log, indent=1), "```", ""]
    (BENCH_DIR / "RESULTS.md").write_text("\n".join(lines))


def loads(log: dict) -> str:
    spans = [
        f"{name} {v['load_average_1m'][0]}–{v['load_average_1m'][1]}"
        for name, v in log.items()
        if isinstance(v, dict) and "load_average_1m" in v
    ]
    return ", ".join(spans) or "not recorded"


def ray_section(ray_runs: dict, train: dict) -> list[str]:
    if not ray_runs:
        return []
    in_process = _get(train, "tiny", "pairs_per_s", default={})
    lines = [
        "### Real Ray Train runs (offline, tiny model, the same data, batch and max_length)",
        "",
        "`run_training` — what `spo-ray train` runs: Ray Data streams the shard, a TorchTrainer worker "
        "runs the loop, metrics every step. Medians over the steady steps of metrics.jsonl.",
        "",
        "| run | workers × CPUs | median s/step | pairs/s | data wait s | in-process pairs/s (section 1) |",
        "|---|---|---|---|---|---|",
    ]
    for name, key in (("spo_1w", "spo_ray_spo"), ("dpo_1w", "spo_ray_dpo"), ("spo_2w", "spo_ray_spo")):
        r = ray_runs.get(name)
        if r:
            lines.append(
                f"| {r['loss'].upper()} | {r['workers']} × {r.get('cpus_per_worker', 1)} | {r['step_seconds']:.3f} | {r['pairs_per_s']:.2f} | "
                f"{r['data_wait_seconds']:.3f} | {fmt(in_process.get(key), 2) if r['workers'] == 1 else '–'} |"
            )
    lines += [
        "",
        f"Scaling, 2 workers ÷ 1 worker (pairs/s, batch per worker fixed): "
        f"**{fmt(ray_runs.get('scaling_2w_over_1w_pairs_per_s'), 2)}×**. Caveat: this machine has 2 cores, "
        "so the two DDP workers (1 CPU each, gloo all-reduce) split the cores the single worker used as torch "
        "threads; the figure shows that the code path clusters use works and what data parallelism costs here, "
        "not the speed-up a second machine gives.",
        "",
    ]
    return lines


def online_section(online: dict) -> list[str]:
    if not online:
        return []
    s = online["settings"]
    lines = [
        "## 2. Online overhead",
        "",
        f"Synthetic expert task (`{s['config']}`), tiny model, batch {s['batch_size']} pairs, {s['steps']} steps per "
        f"run; online: global KL (c_KL={s['kl_coef']}) on {s['prompts_per_step']}×{s['samples_per_prompt']} samples of "
        f"≤{s['max_tokens']} tokens per step from one {s['backend']} rollout actor, weights synced every "
        f"{s['sync_every']} step. Medians over the steady steps of each run.",
        "",
        "| run | s/step | ÷ offline | ÷ compute floor | generation wait s | weight sync s | data wait s | compute s (fwd/bwd/opt + KL) | of which KL forwards s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    offline = online["offline"]["step_seconds"]
    for name in ("offline", "online_overlap", "online_overlap_wait_sync", "online_no_overlap"):
        if name not in online:  # runs before rollout.async_sync had no waiting-sync row
            continue
        r = online[name]
        floor = r.get("compute_floor_seconds", offline)
        lines.append(
            f"| {name.replace('_', ' ')} | {r['step_seconds']:.3f} | {r['step_seconds'] / offline:.2f}× | "
            f"{r['step_seconds'] / floor:.2f}× | {r['gen_wait_seconds']:.3f} | {r['sync_seconds']:.3f} | "
            f"{r['data_wait_seconds']:.3f} | {r['compute_seconds']:.3f} | {r.get('kl_forward_seconds', 0.0):.3f} |"
        )
    lines += [
        "",
        f"`online_overhead_ratio` (with overlap) = **{online['online_overhead_ratio']:.2f}**; without overlap "
        f"{online['online_overhead_ratio_no_overlap']:.2f}.",
    ]
    if "online_overhead_vs_compute_floor" in online:
        over = online["online_overlap"]["over_floor"]
        lines += [
            "",
            "`online_overhead_vs_compute_floor` (online step ÷ (offline step + the KL forwards' own compute, timed "
            f"inside the online run's steps)) = **{online['online_overhead_vs_compute_floor']:.2f}** with overlap "
            f"(goal ≤ 1.05), {online['online_overhead_vs_compute_floor_no_overlap']:.2f} without. Above the floor, "
            "per step with overlap: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.3f} s" for k, v in over.items())
            + " (compute beyond the floor: the KL backward, sample collation and the step's other online work).",
        ]
    return lines + [""]


def rollout_section(rollout: dict) -> list[str]:
    rows = _get(rollout, "results", default=[])
    if not rows:
        return []
    lines = [
        "## 3–4. Generation and weight sync",
        "",
        "From `bench/bench_rollout.py` (one rollout actor, 32 prompts × up to 32 new tokens; tokens/s is the "
        "best of its repetitions, sync and memcpy are medians; memcpy copies the same serialized bytes in the "
        "driver process).",
        "",
        "| model | backend | MB | tokens/s | vLLM ÷ HF | sync s | sync MB/s | memcpy MB/s | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_model: dict = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["backend"]] = r
    for r in rows:
        pair = by_model[r["model"]]
        ratio = (
            pair["vllm"]["tokens_per_s"] / pair["hf"]["tokens_per_s"]
            if "vllm" in pair and "hf" in pair
            else None
        )
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['megabytes']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{fmt(ratio, 2) if r['backend'] == 'vllm' else ''} | {r['sync_s']:.3f} | {r['sync_mb_per_s']:.0f} | "
            f"{r['memcpy_mb_per_s']:.0f} | {r.get('load_average_1m', '')} |"
        )
    return lines + [""] + lora_sync_lines(_get(rollout, "lora", default={}))


def lora_sync_lines(lora: dict) -> list[str]:
    """The LoRA sync table of bench_rollout.py: merged model vs adapter alone (`rollout.lora_sync`)."""
    if not lora:
        return []
    lines = [
        "LoRA r = 8 on every linear layer, one vLLM engine with `enable_lora` (medians; each sync includes the "
        "trainer's preparation: merging, or picking out the adapter):",
        "",
        "| model | merged MB | adapter MB | `lora_sync_bytes_ratio` | merged sync s | adapter sync s | s ratio | "
        "log-prob gap after adapter sync |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in lora.items():
        lines.append(
            f"| {name} | {r['merged_bytes'] / 1e6:.1f} | {r['adapter_bytes'] / 1e6:.2f} | "
            f"{r['lora_sync_bytes_ratio']:.1f} | {r['merged_sync_s']:.3f} | {r['adapter_sync_s']:.3f} | "
            f"{r['lora_sync_seconds_ratio']:.1f} | {r['adapter_logprob_gap']:.1e} |"
        )
    return lines + [""]


def quality_section(quality: dict) -> list[str]:
    rows = quality.get("rows") or {}
    if not rows:
        return []
    s = quality["settings"]
    floor = quality.get("data_floor_tv", {})
    lines = [
        "## Alignment quality: the synthetic expert task",
        "",
        f"`{quality['config']}`: tiny model fitted to a non-uniform reference q, {s['num_pairs']} Bradley–Terry pairs, "
        f"{s['max_steps']} steps × batch {s['batch_size']}, lr {s['lr']}, every method on the same data and budget, "
        "offline (`loss.kl_coef=0`) except the last row (global KL c_KL="
        f"{s['online_kl_coef']} on vLLM samples). Exact evaluation on S(x) by teacher forcing. Target: "
        "softmax(r/α) with the method's α (SPO), α=1 for the others (the Bradley–Terry scale of the data). "
        f"The data's own floor (TV of its Bradley–Terry MLE's softmax to the target): α=0.5 {fmt(floor.get('0.5'))}, "
        f"α=1 {fmt(floor.get('1.0'))}, α=2 {fmt(floor.get('2.0'))}.",
        "",
        "| method | TV to softmax(r/α) ↓ | entropy (target) | mass on S | expected reward (target) | KL to reference on S | TV to DPO optimum π_ref·e^{r/β} |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = quality["reference"]
    lines.append(
        f"| reference (before training) | {ref['tv_to_target']:.3f} | {ref['entropy']:.3f} ({ref['target_entropy']:.3f}) | "
        f"{ref['mass_on_s']:.3f} | {ref['expected_reward']:.3f} ({ref['target_expected_reward']:.3f}) | 0 | – |"
    )
    for r in rows.values():
        lines.append(
            f"| {r['label']} | **{r['tv_to_target']:.3f}** | {r['entropy']:.3f} ({r['target_entropy']:.3f}) | "
            f"{r['mass_on_s']:.3f} | {r['expected_reward']:.3f} ({r['target_expected_reward']:.3f}) | "
            f"{r['kl_to_reference_on_s']:.3f} | {r['tv_to_dpo_optimum']:.3f} |"
        )
    return lines + [""] + quality_reading(rows, floor)


def quality_reading(rows: dict, floor: dict) -> list[str]:
    """A few sentences reading the table, with its own numbers."""
    spo = [r for n, r in rows.items() if n.startswith("spo_a") and not r["online"]]
    offline = [r for r in rows.values() if not r["online"]]
    online = next((r for r in rows.values() if r["online"]), None)
    dpo = rows.get("dpo_b0.1")
    dpo1 = rows.get("dpo_b1")
    text = []
    if spo:
        text.append(
            f"Offline SPO lands within TV {max(r['tv_to_target'] for r in spo):.3f} of softmax(r/α) for every α "
            f"(the data's floor is ≈ {max(floor.values(), default=0):.3f}), with the entropy following α as SPEC §2.3 "
            "says; the reference, anti-aligned with r, does not pull it."
        )
    if dpo and dpo1:
        text.append(
            f"DPO goes where its theory says, to π_ref·exp(r/β) (TV to that optimum {dpo['tv_to_dpo_optimum']:.3f} at "
            f"β=0.1, {dpo1['tv_to_dpo_optimum']:.3f} at β=1), not to the expert's distribution: at β=0.1 it collapses "
            f"onto the best answer (entropy {dpo['entropy']:.2f}), and even at β=1, the temperature of the data, the "
            f"reference's tilt leaves it {dpo1['tv_to_target']:.3f} from softmax(r)."
        )
    weighted, plain = rows.get("spo_a1_w"), rows.get("spo_a1")
    if weighted and plain:
        text.append(
            f"Pair weighting (loss.pair_weight_gamma=1) leaves SPO α=1 on the same target: TV {weighted['tv_to_target']:.3f} "
            f"(plain {plain['tv_to_target']:.3f}), entropy {weighted['entropy']:.3f} ({plain['entropy']:.3f}); on "
            "Bradley–Terry pairs the weights change which pairs the gradient listens to, not the optimum."
        )
    degree, split = rows.get("spo_a1_sspo"), rows.get("spo_a1_heldout") or plain
    if degree and split:
        text.append(
            f"The self-supervised degree loss (loss.sspo_lambda=0.5, K=3) leaves SPO α=1 on its target: TV "
            f"{degree['tv_to_target']:.3f} (λ=0 on the same pairs {split['tv_to_target']:.3f}), while its head tells "
            f"the 3 degrees apart on held-out rows with accuracy {degree['degree_acc_held_out']:.3f} (chance 0.333)."
        )
    collapsed = [r["label"] for r in rows.values() if r["entropy"] < 0.25]
    if collapsed:
        text.append(f"Collapsed to (almost) one answer per prompt: {', '.join(collapsed)}.")
    if offline and online:
        text.append(
            f"Offline, every method lets probability leave S (mass on S ≤ {max(r['mass_on_s'] for r in offline):.3f}): "
            "pairwise terms fix only ratios inside S. Online SPO's global KL on the model's own samples keeps "
            f"{online['mass_on_s']:.2f} of the mass on S while staying {online['tv_to_target']:.3f} from the target: "
            "what SPO's regularizer is for."
        )
    return [" ".join(text), ""] if text else []


def quality_plots(quality: dict) -> list[str]:
    return [
        f"![{name}]({name}.png)"
        for name in ("quality_vs_target", "quality_distributions")
        if (BENCH_DIR / f"{name}.png").exists()
    ]


def kl_memory_section(kl: dict) -> list[str]:
    settings = kl.get("settings") or {}
    if not settings:
        return []
    lines = [
        "## Memory of the global-KL term (bench/bench_kl_memory.py)",
        "",
        f"{kl['model']} + LoRA r=8, {kl['num_samples']} online samples × {kl['sample_tokens']} sampled tokens "
        f"(prompts 16–44 tokens), `token` estimator: the term's forward and backward, peak of live tensor bytes "
        "from torch.profiler's allocation events (each run in a fresh process, after one unmeasured run), and "
        "the process's peak RSS growth over the same run. `full_logits` is the term before chunking ([S, T, V] "
        "logits of policy and reference, a second log-softmax for the entropy); `chunked` runs the LM heads on "
        "the sampled tokens' positions only, a checkpointed chunk of rows at a time.",
        "",
        "| setting | full_logits MiB | chunked MiB | ratio | RSS growth full / chunked MiB |",
        "|---|---|---|---|---|",
    ]
    for name, r in settings.items():
        peak, rss = r["profiled_peak_mib"], r["rss_peak_growth_mib"]
        lines.append(
            f"| {name.replace('_', ' ')} | {peak['full_logits']['median']:.0f} | {peak['chunked']['median']:.0f} | "
            f"**{r['ratio']:.2f}** | {fmt(_get(rss, 'full_logits', 'median'), 0)} / {fmt(_get(rss, 'chunked', 'median'), 0)} |"
        )
    check = kl.get("check") or {}
    if check:
        lines += [
            "",
            f"Same weights and samples, both variants: loss differs by {check['loss_max_abs_diff']:.1e}, exact token "
            f"KL by {check['kl_token_max_abs_diff']:.1e} (mean {check['kl_token_mean']:.3f} nats), entropy by "
            f"{check['entropy_max_abs_diff']:.1e}, LoRA gradients by {check['grad_max_abs_diff']:.1e} "
            f"(largest {check['grad_max_abs']:.1e}); float32.",
        ]
    return lines + [""]


def seqpo_results(seqpo: dict) -> dict:
    """results.json keys of bench_seqpo.py (none when it has not run)."""
    if not seqpo:
        return {}
    return {
        "seqpo_tv_to_closed_form": seqpo["tv_both_stages_to_closed_form"],
        "seqpo_tv_r2_alone_to_closed_form": seqpo["tv_r2_alone_to_closed_form"],
        "seqpo": seqpo,
    }


def seqpo_section(seqpo: dict) -> list[str]:
    """Sequential PO on two reward tables: TV of both stages and of r2 alone to the closed-form optimum."""
    if not seqpo:
        return []
    st = seqpo["settings"]
    lam, beta = st["lambda"], st["beta"]
    er1, er2, mass = seqpo["expected_r1"], seqpo["expected_r2"], seqpo["mass_on_s"]
    return [
        "## Sequential PO: two preference dimensions (bench/bench_seqpo.py)",
        "",
        f"The synthetic expert task with two reward tables over the same S(x): r1 (the task's) and r2 (an "
        f"independent one), {st['pairs_per_dimension']} Bradley–Terry pairs each in one file, each row labelled "
        f"with its `dimension`. `spo-ray stages` (`loss.name=seqpo`, β={beta:g}, λ={lam:g}, "
        f"{st['steps_per_stage']} steps per stage, offline) trains r1, then r2 from stage 1's model; "
        f"\"r2 alone\" is DPO β={beta:g} on r2's rows from π_0, the same steps. Target: the paper's closed form "
        f"π_2 ∝ π_1·exp((r2 + λ·r1)/β) = π_0·exp(((1+λ)·r1 + r2)/β), π_0 the fitted reference. TV on S "
        "(renormalized), mean over prompts.",
        "",
        "| model | TV to closed-form π_2 ↓ | other TV | E[r1] on S | E[r2] on S | mass on S |",
        "|---|---|---|---|---|---|",
        f"| reference π_0 | {seqpo['tv_reference_to_closed_form']:.3f} | – | {er1['reference']:.3f} | "
        f"{er2['reference']:.3f} | – |",
        f"| stage 1 (r1) | – | {seqpo['tv_stage1_to_its_optimum']:.3f} to π_0·e^(r1/β) | {er1['stage1']:.3f} | "
        f"{er2['stage1']:.3f} | {mass['stage1']:.3f} |",
        f"| **both stages (seqpo)** | **{seqpo['tv_both_stages_to_closed_form']:.3f}** | "
        f"{seqpo['tv_both_stages_to_optimum_from_reached_stage1']:.3f} to π_1·e^((r2+λr1)/β) from the reached π_1 | "
        f"{er1['stage2']:.3f} | {er2['stage2']:.3f} | {mass['stage2']:.3f} |",
        f"| r2 alone (DPO) | {seqpo['tv_r2_alone_to_closed_form']:.3f} | "
        f"{seqpo['tv_r2_alone_to_its_own_optimum']:.3f} to π_0·e^(r2/β) | {er1['r2_alone']:.3f} | "
        f"{er2['r2_alone']:.3f} | {mass['r2_alone']:.3f} |",
        f"| closed form | 0 | – | {er1['closed_form']:.3f} | {er2['closed_form']:.3f} | – |",
        "",
        f"Wall time: stages {seqpo['wall_seconds']['stages']:.0f} s, r2 alone {seqpo['wall_seconds']['r2_alone']:.0f} s.",
        "",
    ]


def data_section(data: dict) -> list[str]:
    rows = data.get("results") or []
    if not rows:
        vs_trl = data_vs_trl.markdown(data.get("vs_trl") or {})
        return ["## Data pipeline (bench/bench_data.py)", "", *vs_trl] if vs_trl else []
    lines = [
        "## Data pipeline (bench/bench_data.py)",
        "",
        "| rows | prepare s | tokenized rows/s | epoch read rows/s | driver peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rows']} | {r['prepare_seconds']} | {r['tokenized_rows_per_s']} | {r['epoch_rows_per_s']} | {r['driver_peak_rss_mb']} |"
        )
    lines += ["", f"Driver peak RSS growth between the sizes: {data.get('peak_rss_growth_mb')} MB.", ""]
    return lines + data_vs_trl.markdown(data.get("vs_trl") or {})


def make_plots(train: dict, online: dict, rollout: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = [m for m in ("tiny", "smollm2") if train.get(m) and "pairs_per_s" in train[m]]
    if models:
        keys = ["trl_dpo", "spo_ray_dpo", "spo_ray_spo", "bare_padded", "bare_spo_ray_layout"]
        labels = ["TRL DPO", "spo_ray DPO", "spo_ray SPO", "bare (padded)", "bare (spo_ray layout)"]
        figure, axes = plt.subplots(
            1, len(models), figsize=(5.2 * len(models), 3.6), squeeze=False, layout="constrained"
        )
        for axis, model in zip(axes.flat, models):
            values = [train[model]["pairs_per_s"][k] for k in keys]
            axis.bar(labels, values, color=["#7f7f7f", "#1f77b4", "#d62728", "#bbbbbb", "#dddddd"])
            axis.set_title(f"{model}: pairs/s (median, higher is better)", fontsize=10)
            axis.tick_params(axis="x", labelrotation=25, labelsize=8)
        paths.append(BENCH_DIR / "train_throughput.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    if online:
        names = [
            n
            for n in ("offline", "online_overlap", "online_overlap_wait_sync", "online_no_overlap")
            if n in online
        ]
        parts = [
            ("compute_seconds", "compute", "#1f77b4"),
            ("gen_wait_seconds", "generation wait", "#d62728"),
            ("sync_seconds", "weight sync", "#2ca02c"),
            ("data_wait_seconds", "data wait", "#bbbbbb"),
        ]
        figure, axis = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
        bottom = [0.0] * len(names)
        for key, label, color in parts:
            values = [online[n][key] for n in names]
            axis.bar(names, values, bottom=bottom, label=label, color=color)
            bottom = [b + v for b, v in zip(bottom, values)]
        axis.set_ylabel("seconds per step (medians)")
        axis.set_title("Online SPO: where a step's time goes", fontsize=10)
        axis.legend(fontsize=8)
        paths.append(BENCH_DIR / "online_breakdown.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    rows = _get(rollout, "results", default=[])
    if rows:
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
        for backend, marker in (("vllm", "o"), ("hf", "s")):
            sel = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["megabytes"])
            axes[0].plot(
                [r["megabytes"] for r in sel],
                [r["sync_mb_per_s"] for r in sel],
                marker=marker,
                label=f"sync to {backend}",
            )
            axes[0].plot(
                [r["megabytes"] for r in sel],
                [r["memcpy_mb_per_s"] for r in sel],
                marker=marker,
                ls="--",
                label=f"memcpy ({backend} run)",
            )
        axes[0].set_xscale("log")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("model MB (fp32)")
        axes[0].set_ylabel("MB/s")
        axes[0].set_title("Weight sync vs plain memory copy", fontsize=10)
        axes[0].legend(fontsize=7)
        models = list(dict.fromkeys(r["model"] for r in rows))
        for i, backend in enumerate(("vllm", "hf")):
            values = [
                next((r["tokens_per_s"] for r in rows if r["model"] == m and r["backend"] == backend), 0)
                for m in models
            ]
            axes[1].bar([x + 0.4 * i for x in range(len(models))], values, 0.4, label=backend)
        axes[1].set_xticks([x + 0.2 for x in range(len(models))], models)
        axes[1].set_yscale("log")
        axes[1].set_ylabel("generated tokens/s")
        axes[1].set_title("Generation: vLLM vs HF generate", fontsize=10)
        axes[1].legend(fontsize=8)
        paths.append(BENCH_DIR / "rollout.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps and repetitions (about half the time)"
    )
    parser.add_argument(
        "--threads", default="auto", help="torch threads for section train ('auto': see threads_for_timing)"
    )
    parser.add_argument(
        "--report", action="store_true", help="only rebuild RESULTS.md/results.json/plots from bench/out"
    )
    args = parser.parse_args()
    sections = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    log_path = OUT / "run_log.json"
    log = read_json(log_path) or {}
    started = time.perf_counter()
    if not args.report:
        for name in sections:
            run_section(name, args, log)
        if set(sections) == set(SECTIONS):
            log["full_run_seconds"] = round(time.perf_counter() - started, 1)
            log["full_run_quick"] = args.quick
        write_json(log_path, log)
    report(log)
    print(
        f"wrote {BENCH_DIR / 'RESULTS.md'} and {BENCH_DIR / 'results.json'} in {time.perf_counter() - started:.0f}s"
    )


if __name__ == "__main__":
    main()
