"""RESULTS.md section, results.json keys and the plot of bench_online_real.py (section `online_real`)."""

from __future__ import annotations

import random
from pathlib import Path

LABELS = {
    "spo_a0.5": "spo_ray iterative SPO, α=0.5",
    "spo_a2": "spo_ray iterative SPO, α=2",
    "dpo": "spo_ray iterative DPO, β=0.1",
    "trl_grpo": "TRL GRPOTrainer",
    "trl_online_dpo": "TRL OnlineDPOTrainer, β=0.1",
}


def _final(run: dict) -> dict:
    return run["points"][-1]


def gain(run: dict) -> float:
    return _final(run)["eval"]["accuracy"] - run["points"][0]["eval"]["accuracy"]


def gain_ci(run: dict, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of after − before, resampling the (shared) held-out prompts, paired."""
    before = run["points"][0]["eval"]["per_prompt_accuracy"]
    after = _final(run)["eval"]["per_prompt_accuracy"]
    diffs = [a - b for a, b in zip(after, before)]
    rng, n = random.Random(seed), len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]]


def tokens_per_s(run: dict) -> float:
    return _final(run)["tokens"] / run["wall_seconds"]


def max_gap(run: dict) -> float | None:
    gaps = [g for per_round in run.get("rollout_logp_gap_per_round", []) for g in per_round]
    return max(gaps) if gaps else None


def results_keys(data: dict) -> dict:
    """The issue's headline keys and a compact per-run record for results.json."""
    runs = data.get("runs", {})
    if not runs:
        return {}
    spo = {k: v for k, v in runs.items() if k.startswith("spo_")}
    best = max(spo, key=lambda k: gain(spo[k])) if spo else None
    out: dict = {"online_accuracy_gain_spo": round(gain(spo[best]), 4) if best else None}
    grpo = runs.get("trl_grpo")
    out["online_accuracy_gain_vs_trl_grpo"] = None
    if best and grpo:
        if gain(grpo) > 0:
            out["online_accuracy_gain_vs_trl_grpo"] = round(gain(spo[best]) / gain(grpo), 3)
        else:
            out["online_accuracy_gain_vs_trl_grpo_reason"] = (
                f"GRPO's gain is {gain(grpo):+.4f} (not > 0): the ratio is undefined; see online_real.runs"
            )
    out["online_wall_ratio_vs_trl_grpo"] = (
        round(grpo["wall_seconds"] / spo[best]["wall_seconds"], 3) if best and grpo else None
    )
    cpu = [r.get("cpu_seconds") for r in (grpo, spo.get(best))] if best and grpo else [None]
    out["online_cpu_seconds_ratio_vs_trl_grpo"] = round(cpu[0] / cpu[1], 3) if all(cpu) else None
    out["online_real"] = {
        "best_spo_run": best,
        "model": "SmolLM2-135M-Instruct, LoRA r=8",
        "budget": next(iter(runs.values()))["budget"],
        "seeds": 1,
        "runs": {
            name: {
                "accuracy_before": run["points"][0]["eval"]["accuracy"],
                "accuracy_after": _final(run)["eval"]["accuracy"],
                "accuracy_after_ci95": _final(run)["eval"]["accuracy_ci95"],
                "gain": round(gain(run), 4),
                "gain_ci95": gain_ci(run),
                "distinct_answers_per_prompt": _final(run)["eval"]["distinct_answers_per_prompt"],
                "kl_to_start": round(_final(run)["eval"]["kl_to_start"], 4),
                "wall_seconds": run["wall_seconds"],
                "cpu_seconds": run.get("cpu_seconds"),
                "generated_samples": _final(run)["samples"],
                "generated_tokens": _final(run)["tokens"],
                "generated_tokens_per_s": round(tokens_per_s(run), 2),
                "optimizer_steps": _final(run)["steps"],
                "peak_rss_gib": run.get("peak_rss_gib"),
                "rollout_logp_gap_max": max_gap(run),
                "generation": run.get("generation"),
            }
            for name, run in runs.items()
        },
    }
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def section(data: dict, plot: str | None) -> list[str]:
    runs = data.get("runs", {})
    if not runs:
        return []
    start = data["start"]
    budget = next(iter(runs.values()))["budget"]
    lines = [
        "## Online on a real model (issue 16)",
        "",
        f"SmolLM2-135M-Instruct (LoRA r={budget['lora_r']}, alpha {budget['lora_alpha']}, lr {budget['lr']}) on "
        "the built-in arithmetic task (one-step word problems; judge: the last integer equals the answer). "
        f"Same train prompts for every run ({budget['rounds']} × {budget['prompts_per_round']} prompts drawn "
        f"by spo_ray's rounds), {budget['candidates']} samples per prompt at T={budget['temperature']}, "
        f"{budget['rounds'] * budget['steps_per_round']} optimizer steps, one seed. Held-out: "
        f"{start['prompts']} test prompts × {start['samples_per_prompt']} samples at T=0.7, one evaluator "
        "(`spo-ray generate`: vLLM on CPU, seeded) for every model; 95% CIs bootstrap over prompts (the gain's "
        "interval is paired on the same prompts). Start: "
        f"{_pct(start['accuracy'])} [{_pct(start['accuracy_ci95'][0])}, {_pct(start['accuracy_ci95'][1])}], "
        f"pass@{start['samples_per_prompt']} {_pct(start['pass_at_n'])}, "
        f"{start['distinct_answers_per_prompt']:.2f} distinct answers per prompt. KL(π‖π₀): nats per "
        f"response, Σ over its tokens of the exact per-position KL, on {start.get('kl_samples', '?')} held-out "
        "samples of π. Reproduce: `python bench/run_all.py --only online_real`.",
        "",
        "How each trainer spends the budget. spo_ray (`spo-ray iterate`, configs/arithmetic_smollm2.yaml): per "
        "round, vLLM samples the 8 candidates of each prompt, the judge keeps right-vs-wrong pairs (ties "
        f"skipped), {budget['steps_per_round']} steps of 4 pairs train the LoRA with the global KL "
        f"(kl_coef {budget['kl_coef']}) on 2 online vLLM samples per step (`rollout.overlap=false`: drawn after "
        "each step's sync, so the log-prob gap is engine numerics alone), then the adapter is merged. "
        "GRPOTrainer: one generation batch per round (8 prompts × 8, transformers generate), split into "
        f"{budget['steps_per_round']} steps of 16 completions; loss `dapo`, group-scaled advantages, "
        f"beta {budget['kl_coef']}. OnlineDPOTrainer: 2 samples per prompt ranked by the reward, 8 prompts per "
        "step (ties are trained on as they come), sigmoid loss. TRL: fp32, no gradient checkpointing "
        "(its defaults, bf16 autocast and checkpointing, are slower on CPU, and checkpointing also turns off "
        "OnlineDPO's KV cache), cosine schedule over all steps without warmup; spo_ray: cosine within each "
        "round. Wall time: process start to the trained model (spo_ray: Ray and vLLM start-up, its own cheap "
        "per-round eval of 16 prompts, merges included); CPU s: the run's process tree, user + system.",
        "",
        "| run | generation | accuracy after [95% CI] | gain [95% CI] | distinct answers | KL to start | "
        "wall s | CPU s | samples | tokens | tokens/s | steps | peak RSS GiB (trainer / vLLM / total) | "
        "max logp gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        e, final = _final(run)["eval"], _final(run)
        lo, hi = e["accuracy_ci95"]
        glo, ghi = gain_ci(run)
        rss = run.get("peak_rss_gib") or {}
        trainer = rss.get("trainer", rss.get("driver"))
        memory = f"{trainer or 0:.2f} / {rss.get('vllm', 0):.2f} / {rss.get('total', 0):.2f}" if rss else "-"
        cpu = run.get("cpu_seconds")
        gap = max_gap(run)
        lines.append(
            f"| {LABELS.get(name, name)} | {run.get('generation')} | {_pct(e['accuracy'])} [{_pct(lo)}, "
            f"{_pct(hi)}] | {100 * gain(run):+.1f} pts [{100 * glo:+.1f}, {100 * ghi:+.1f}] | "
            f"{e['distinct_answers_per_prompt']:.2f} | {e['kl_to_start']:.3f} | {run['wall_seconds']:.0f} | {'-' if cpu is None else f'{cpu:.0f}'} | "
            f"{final['samples']} | {final['tokens']} | {tokens_per_s(run):.1f} | {final['steps']} | {memory} | "
            f"{'-' if gap is None else f'{gap:.2e}'} |"
        )
    lines.append("")
    if plot:
        lines += [f"![online_real]({plot})", ""]
    return lines


def make_plot(data: dict, path: Path) -> Path | None:
    runs = data.get("runs", {})
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, run in runs.items():
        points = [p for p in run["points"] if "eval" in p]
        acc = [100 * p["eval"]["accuracy"] for p in points]
        final = points[-1]["eval"]
        lo, hi = 100 * final["accuracy_ci95"][0], 100 * final["accuracy_ci95"][1]
        for ax, key in zip(axes, ("seconds", "tokens")):
            xs = [p[key] for p in points]
            line = ax.plot(xs, acc, marker="o", label=LABELS.get(name, name))[0]
            ax.errorbar([xs[-1]], [acc[-1]], yerr=[[acc[-1] - lo], [hi - acc[-1]]], color=line.get_color())
    axes[0].set_xlabel("wall time, s (process start to trained model)")
    axes[1].set_xlabel("generated tokens (training samples)")
    axes[0].set_ylabel("held-out accuracy, % (95% CI)")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M + LoRA on arithmetic: held-out accuracy, start and end of each run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
