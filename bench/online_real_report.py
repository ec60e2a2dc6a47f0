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


def start_evaluations(data: dict) -> list[dict]:
    """Every evaluation of the start model: the one the runs were scored beside, then those under other
    evaluator seeds (`--start-eval-seeds`)."""
    return [data["start"], *(data.get("start_spread") or {}).values()] if data.get("start") else []


def pooled_start(data: dict) -> dict | None:
    """The start figure every gain is taken against: per prompt, the mean over every evaluation of the start
    model. vLLM's seeded samples on CPU differ from one process to the next, so one evaluation of 64 prompts ×
    2 samples carries a spread of its own; pooling several shrinks the start's share of each gain's noise."""
    evaluations = start_evaluations(data)
    if len(evaluations) < 2:
        return None
    per_prompt = [_mean(column) for column in zip(*(e["per_prompt_accuracy"] for e in evaluations))]
    return {**data["start"], "accuracy": _mean(per_prompt), "per_prompt_accuracy": per_prompt}


def seed_runs(data: dict) -> dict[str, list[dict]]:
    """Each run's seeds, in seed order: {name: [run of seed 0, run of seed 1, ...]}. `data["seeds"]` maps a seed
    to its runs; a results file of one seed (`data["runs"]`, before seeds) reads as seed 0. With the start model
    scored more than once, each run's first point holds the pooled start (`pooled_start`)."""
    by_seed = data.get("seeds") or ({"0": data["runs"]} if data.get("runs") else {})
    start = pooled_start(data)
    out: dict[str, list[dict]] = {}
    for seed in sorted(by_seed, key=int):
        for name, run in by_seed[seed].items():
            if start is not None:
                run = {**run, "points": [{**run["points"][0], "eval": start}, *run["points"][1:]]}
            out.setdefault(name, []).append(run)
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _gain_one(run: dict) -> float:
    return _final(run)["eval"]["accuracy"] - run["points"][0]["eval"]["accuracy"]


def gain(runs: list[dict]) -> float:
    """Held-out accuracy after − before, the mean over seeds."""
    return _mean(_gain_one(run) for run in runs)


def after(runs: list[dict]) -> float:
    return _mean(_final(run)["eval"]["accuracy"] for run in runs)


def hierarchical_ci(per_seed: list[list[float]], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the mean over seeds of the mean over prompts: each resample draws the seeds
    with replacement, then the prompts of each drawn seed with replacement (one value per prompt, e.g. the
    paired after − before). With one seed it is the plain bootstrap over prompts."""
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        drawn = [per_seed[rng.randrange(len(per_seed))] for _ in per_seed]
        means.append(_mean(_mean(v[rng.randrange(len(v))] for _ in v) for v in drawn))
    means.sort()
    return [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]]


def gain_ci(runs: list[dict]) -> list[float]:
    """95% interval of the gain over prompts and seeds, paired on the (shared) held-out prompts."""
    diffs = []
    for run in runs:
        before = run["points"][0]["eval"]["per_prompt_accuracy"]
        diffs.append([a - b for a, b in zip(_final(run)["eval"]["per_prompt_accuracy"], before)])
    return hierarchical_ci(diffs)


def after_ci(runs: list[dict]) -> list[float]:
    return hierarchical_ci([_final(run)["eval"]["per_prompt_accuracy"] for run in runs])


def final_mean(runs: list[dict], key: str) -> float:
    """The mean over seeds of a figure of the final point's evaluation."""
    return _mean(_final(run)["eval"][key] for run in runs)


def wall(runs: list[dict]) -> float:
    return _mean(run["wall_seconds"] for run in runs)


def cpu(runs: list[dict]) -> float | None:
    values = [run.get("cpu_seconds") for run in runs]
    return _mean(values) if all(values) else None


def tokens(runs: list[dict]) -> float:
    return _mean(_final(run)["tokens"] for run in runs)


def tokens_per_s(runs: list[dict]) -> float:
    return tokens(runs) / wall(runs)


def peak_rss(runs: list[dict]) -> dict:
    """The largest peak RSS of each process group over the seeds."""
    out: dict = {}
    for run in runs:
        for group, value in (run.get("peak_rss_gib") or {}).items():
            out[group] = max(out.get(group, 0.0), value)
    return out


def max_gap(runs: list[dict]) -> float | None:
    gaps = [g for run in runs for per_round in run.get("rollout_logp_gap_per_round", []) for g in per_round]
    return max(gaps) if gaps else None


def results_keys(data: dict) -> dict:
    """The issue's headline keys and a compact per-run record for results.json; every figure is the mean over
    the seeds, its interval over prompts and seeds."""
    runs = seed_runs(data)
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
    out["online_wall_ratio_vs_trl_grpo"] = round(wall(grpo) / wall(spo[best]), 3) if best and grpo else None
    cpus = [cpu(grpo), cpu(spo[best])] if best and grpo else [None]
    out["online_cpu_seconds_ratio_vs_trl_grpo"] = round(cpus[0] / cpus[1], 3) if all(cpus) else None
    out["online_real"] = {
        "best_spo_run": best,
        "model": "SmolLM2-135M-Instruct, LoRA r=8",
        "budget": next(iter(runs.values()))[0]["budget"],
        "seeds": max(len(r) for r in runs.values()),
        "start_accuracy_evaluations": [round(e["accuracy"], 4) for e in start_evaluations(data)],
        "runs": {
            name: {
                "seeds": [r.get("seed", 0) for r in rs],
                "accuracy_before": rs[0]["points"][0]["eval"]["accuracy"],
                "accuracy_after": round(after(rs), 4),
                "accuracy_after_ci95": after_ci(rs),
                "gain": round(gain(rs), 4),
                "gain_ci95": gain_ci(rs),
                "gain_per_seed": [round(_gain_one(r), 4) for r in rs],
                "distinct_answers_per_prompt": round(final_mean(rs, "distinct_answers_per_prompt"), 4),
                "kl_to_start": round(final_mean(rs, "kl_to_start"), 4),
                "wall_seconds": round(wall(rs), 1),
                "cpu_seconds": None if cpu(rs) is None else round(cpu(rs), 1),
                "generated_samples": _mean(_final(r)["samples"] for r in rs),
                "generated_tokens": round(tokens(rs)),
                "generated_tokens_per_s": round(tokens_per_s(rs), 2),
                "optimizer_steps": _final(rs[0])["steps"],
                "peak_rss_gib": peak_rss(rs),
                "rollout_logp_gap_max": max_gap(rs),
                "generation": rs[0].get("generation"),
            }
            for name, rs in runs.items()
        },
    }
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def section(data: dict, plot: str | None) -> list[str]:
    summary = results_keys(data).get("online_real")
    if not summary:
        return []
    start, budget, seeds = data["start"], summary["budget"], summary["seeds"]
    evaluations, pooled = start_evaluations(data), pooled_start(data)
    spread_text = (
        f" The start model was scored {len(evaluations)} times (evaluator seeds and processes differ; vLLM's "
        f"seeded samples on CPU are not reproducible across processes): "
        f"{', '.join(_pct(e['accuracy']) for e in evaluations)}; every gain is against their per-prompt mean, "
        f"{_pct(pooled['accuracy'])}."
        if pooled
        else ""
    )
    lines = [
        "## Online on a real model (issue 16)",
        "",
        f"SmolLM2-135M-Instruct (LoRA r={budget['lora_r']}, alpha {budget['lora_alpha']}, lr {budget['lr']}) on "
        "the built-in arithmetic task (one-step word problems; judge: the last integer equals the answer). "
        f"Same train prompts for every run ({budget['rounds']} × {budget['prompts_per_round']} prompts drawn "
        f"by spo_ray's rounds), {budget['candidates']} samples per prompt at T={budget['temperature']}, "
        f"{budget['rounds'] * budget['steps_per_round']} optimizer steps; "
        f"{seeds} seed{'s' if seeds > 1 else ''} (the seed draws each round's prompts and samples, and sets the "
        "data order and TRL's seed; figures are means over seeds). Held-out: "
        f"{start['prompts']} test prompts × {start['samples_per_prompt']} samples at T=0.7, one evaluator "
        "(`spo-ray generate`: vLLM on CPU, seeded) for every model; 95% CIs: a hierarchical bootstrap over seeds "
        "and, within each, prompts (the gain's interval is paired on the same prompts). Start "
        f"({'its first evaluation' if pooled else 'one evaluation'}): "
        f"{_pct(start['accuracy'])} [{_pct(start['accuracy_ci95'][0])}, {_pct(start['accuracy_ci95'][1])}], "
        f"pass@{start['samples_per_prompt']} {_pct(start['pass_at_n'])}, "
        f"{start['distinct_answers_per_prompt']:.2f} distinct answers per prompt.{spread_text} KL(π‖π₀): nats per "
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
        "| run | generation | accuracy after [95% CI] | gain [95% CI] | gain per seed, pts | distinct answers | "
        "KL to start | wall s | CPU s | samples | tokens | tokens/s | steps | peak RSS GiB (trainer / vLLM / "
        "total) | max logp gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["runs"].items():
        lo, hi = r["accuracy_after_ci95"]
        glo, ghi = r["gain_ci95"]
        per_seed = ", ".join(f"{100 * g:+.1f}" for g in r["gain_per_seed"])
        rss = r["peak_rss_gib"]
        trainer = rss.get("trainer", rss.get("driver"))
        memory = f"{trainer or 0:.2f} / {rss.get('vllm', 0):.2f} / {rss.get('total', 0):.2f}" if rss else "-"
        cpu_s, gap = r["cpu_seconds"], r["rollout_logp_gap_max"]
        lines.append(
            f"| {LABELS.get(name, name)} | {r['generation']} | {_pct(r['accuracy_after'])} [{_pct(lo)}, "
            f"{_pct(hi)}] | {100 * r['gain']:+.1f} pts [{100 * glo:+.1f}, {100 * ghi:+.1f}] | {per_seed} | "
            f"{r['distinct_answers_per_prompt']:.2f} | {r['kl_to_start']:.3f} | {r['wall_seconds']:.0f} | "
            f"{'-' if cpu_s is None else f'{cpu_s:.0f}'} | {r['generated_samples']:.0f} | "
            f"{r['generated_tokens']} | {r['generated_tokens_per_s']:.1f} | {r['optimizer_steps']} | {memory} | "
            f"{'-' if gap is None else f'{gap:.2e}'} |"
        )
    lines.append("")
    if plot:
        lines += [f"![online_real]({plot})", ""]
    return lines


def make_plot(data: dict, path: Path) -> Path | None:
    """Accuracy against wall time and against generated tokens: each run's points averaged over its seeds
    (the points are the start and the end of each round), with the final point's interval."""
    runs = seed_runs(data)
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, rs in runs.items():
        evaluated = [i for i, p in enumerate(rs[0]["points"]) if "eval" in p]
        acc = [100 * _mean(r["points"][i]["eval"]["accuracy"] for r in rs) for i in evaluated]
        lo, hi = (100 * x for x in after_ci(rs))
        for ax, key in zip(axes, ("seconds", "tokens")):
            xs = [_mean(r["points"][i][key] for r in rs) for i in evaluated]
            line = ax.plot(xs, acc, marker="o", label=LABELS.get(name, name))[0]
            ax.errorbar([xs[-1]], [acc[-1]], yerr=[[acc[-1] - lo], [hi - acc[-1]]], color=line.get_color())
    axes[0].set_xlabel("wall time, s (process start to trained model)")
    axes[1].set_xlabel("generated tokens (training samples)")
    axes[0].set_ylabel("held-out accuracy, % (95% CI)")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "SmolLM2-135M + LoRA on arithmetic: held-out accuracy (mean over seeds), start and end of each run"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
