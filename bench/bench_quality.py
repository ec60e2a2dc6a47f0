"""Alignment quality on the synthetic expert task: what each loss converges to, against softmax(r/α).

Run: `.venv/bin/python bench/bench_quality.py [--steps N] [--only spo_a1,dpo_b0.1]`.
Every method trains the same tiny reference (fitted once to the task's non-uniform q), on the same
Bradley-Terry pairs, with the same steps, batch and learning rate (those of configs/tiny_cpu.yaml unless
overridden), offline (`loss.kl_coef=0`); one extra row runs SPO α=1 online with the config's global KL.
Each trained policy is evaluated exactly on S(x) (teacher forcing): TV to softmax(r/α), entropy, mass
on S, expected expert reward, KL to the reference on S, and TV to DPO's own optimum π_ref·exp(r/β).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, OUT, REPO, write_json  # noqa: E402

CONFIG = REPO / "configs" / "tiny_cpu.yaml"

# name -> (label, overrides). Offline unless the name ends in "_online"; rows with loss.kl_on=dataset keep
# the config's c_KL on the rows' own responses (no rollout). β of the DPO family is
# loss.beta; SimPO's scale is β=2 with margin γ=0.5 (its paper's range); rDPO assumes 10% flips.
METHODS: dict[str, tuple[str, list[str]]] = {
    "spo_a0.5": ("SPO α=0.5", ["loss.name=spo", "loss.alpha=0.5"]),
    "spo_a1": ("SPO α=1", ["loss.name=spo", "loss.alpha=1.0"]),
    "spo_a2": ("SPO α=2", ["loss.name=spo", "loss.alpha=2.0"]),
    "spo_a1_w": (
        "SPO α=1 pair-weighted γ=1",
        ["loss.name=spo", "loss.alpha=1.0", "loss.pair_weight_gamma=1.0"],
    ),
    # Li et al.'s degree head: held-out rows (5%) give its accuracy on rows it never trained on (eval/sspo_acc)
    "spo_a1_sspo": (
        "SPO α=1 + degree loss λ=0.5 K=3",
        [
            "loss.name=spo",
            "loss.alpha=1.0",
            "loss.sspo_lambda=0.5",
            "loss.sspo_levels=3",
            "data.eval_fraction=0.05",
        ],
    ),
    "spo_a1_heldout": (  # λ = 0 on the same 95% of the pairs as spo_a1_sspo
        "SPO α=1, 5% held out (λ=0)",
        ["loss.name=spo", "loss.alpha=1.0", "data.eval_fraction=0.05"],
    ),
    "dpo_b0.1": ("DPO β=0.1", ["loss.name=dpo", "loss.beta=0.1"]),
    "dpo_b1": ("DPO β=1", ["loss.name=dpo", "loss.beta=1.0"]),
    "ipo_b0.1": ("IPO β=0.1", ["loss.name=ipo", "loss.beta=0.1"]),
    "simpo": ("SimPO β=2 γ=0.5", ["loss.name=simpo", "loss.beta=2.0", "loss.gamma=0.5"]),
    "rdpo_b0.1": ("rDPO β=0.1 ε=0.1", ["loss.name=rdpo", "loss.beta=0.1", "loss.epsilon=0.1"]),
    "spo_a1_online": ("SPO α=1 online", ["loss.name=spo", "loss.alpha=1.0"]),
    # the same KL estimator and c_KL as spo_a1_online, on the rows' own responses (issue 17 item 2)
    "spo_a1_datakl": ("SPO α=1 in-dataset KL", ["loss.name=spo", "loss.alpha=1.0", "loss.kl_on=dataset"]),
    # loss.target_entropy (issue 17 item 5): α adapts from 1 toward each target; scored at the final α*.
    # Measured exactly on each prompt's compared responses in the batch; 400 steps, α moving at 0.05 per nat
    **{
        f"spo_h{target}_compared_online": (
            f"SPO target entropy {target} (compared) online, 400 steps",
            [
                "loss.name=spo",
                "loss.alpha=1.0",
                f"loss.target_entropy={target}",
                "loss.entropy_on=compared",
                "loss.alpha_lr=0.05",
                "train.max_steps=400",
            ],
        )
        for target in (1.1, 0.8, 0.5)
    },
    # not in the default run (--only): the same targets measured on the online samples' likely responses,
    # and fixed-α online SPO at the α the dial ends near, for the section "Entropy as a dial"
    **{
        f"spo_h{target}_online": (
            f"SPO target entropy {target} (samples) online",
            ["loss.name=spo", "loss.alpha=1.0", f"loss.target_entropy={target}"],
        )
        for target in (1.1, 0.8, 0.5)
    },
    **{
        f"spo_a{alpha}_online": (
            f"SPO α={alpha} online, 400 steps",
            ["loss.name=spo", f"loss.alpha={alpha}", "train.max_steps=400"],
        )
        for alpha in (0.5, 0.3)
    },
}


ONLY_ON_REQUEST = {*(f"spo_h{t}_online" for t in (1.1, 0.8, 0.5)), "spo_a0.5_online", "spo_a0.3_online"}


def method_alpha(overrides: list[str]) -> float:
    """The α whose softmax(r/α) the row is scored against: SPO's own α, else 1 (the Bradley-Terry scale)."""
    for item in overrides:
        if item.startswith("loss.alpha="):
            return float(item.split("=", 1)[1])
    return 1.0


def dial_entropy(metrics: dict) -> float:
    """loss.target_entropy rows: the entropy the dial read at a step (entropy/measured), else the whole's."""
    return metrics.get("entropy/measured", metrics["entropy/response"])


def degree_accuracy(steps: list[dict]) -> dict:
    """loss.sspo_lambda rows: the degree head's accuracy on the last step's batch and on the held-out rows."""
    train = [m["sspo_acc"] for m in steps if "sspo_acc" in m]
    held_out = [m["eval/sspo_acc"] for m in steps if "eval/sspo_acc" in m]
    if not train:
        return {}
    return {"degree_acc_train": train[-1], "degree_acc_held_out": held_out[-1] if held_out else None}


def evaluate(model_dir: str, task, alpha: float, beta: float, reference: torch.Tensor) -> dict:
    from spo_ray.models.loading import load_causal_lm, load_tokenizer
    from spo_ray.tasks.synthetic_expert.evaluate import expert_metrics, response_distribution

    model = load_causal_lm(model_dir).eval()
    probs = response_distribution(model, load_tokenizer(model_dir), task)
    return expert_metrics(probs, task, alpha, beta=beta, reference=reference)


def run(names: list[str], extra: list[str], out_dir: Path) -> dict:
    import ray

    from spo_ray.config import load_config
    from spo_ray.models.loading import load_causal_lm, load_tokenizer
    from spo_ray.tasks.synthetic_expert import job as expert_job
    from spo_ray.tasks.synthetic_expert.evaluate import expert_metrics, response_distribution
    from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask
    from spo_ray.training.metrics import read_metrics

    task_root = out_dir / "task_root"
    if not ray.is_initialized():  # one local runtime for all runs, sized for the online row's rollout actor
        from spo_ray.training.runner import local_cpus_needed

        online_cfg = load_config(CONFIG, [*extra])
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, local_cpus_needed(online_cfg)),
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
    common = ["logging.progress=false", "logging.wandb_mode=disabled", "train.checkpoint_every=0", *extra]
    base = load_config(CONFIG, common + [f"output.dir={out_dir / 'base'}"])
    prepared_cfg, task = expert_job.prepare(base, task_root)  # the task, its pairs and the fitted reference
    task = SyntheticExpertTask.load(task_root / "task" / "task.json")
    reference_dir = str(task_root / "expert_reference")
    reference = response_distribution(
        load_causal_lm(reference_dir).eval(), load_tokenizer(reference_dir), task
    )
    rows = [json.loads(line) for line in Path(prepared_cfg.data.train_files[0]).read_text().splitlines()]
    result = {
        "config": str(CONFIG.relative_to(REPO)),
        "settings": {
            "num_pairs": base.task.num_pairs,
            "max_steps": base.train.max_steps,
            "batch_size": base.train.batch_size,
            "lr": base.train.lr,
            "online_kl_coef": base.loss.kl_coef,
            "extra_overrides": extra,
        },
        "reference": expert_metrics(reference, task, 1.0, reference=reference),
        "rows": {},
    }
    from spo_ray.tasks.synthetic_expert.evaluate import empirical_optimum

    result["data_floor_tv"] = {}
    for alpha in (0.5, 1.0, 2.0):
        best = empirical_optimum(task, rows, alpha)
        result["data_floor_tv"][str(alpha)] = float(
            (0.5 * (best - task.target_distribution(alpha)).abs().sum(-1)).mean()
        )
    for name in names:
        label, overrides = METHODS[name]
        online = name.endswith("_online")
        run_overrides = common + overrides + [f"output.dir={out_dir / name}"]
        if not online and "loss.kl_on=dataset" not in overrides:
            run_overrides.append("loss.kl_coef=0")
        cfg = load_config(CONFIG, run_overrides)
        shutil.rmtree(
            out_dir / name, ignore_errors=True
        )  # a run dir with checkpoints would resume, not train
        started = time.perf_counter()
        summary = expert_job.run_job(cfg, task_root=task_root)
        wall = time.perf_counter() - started
        alpha = method_alpha(overrides)
        steps = read_metrics(out_dir / name)
        dial = {}
        if cfg.loss.target_entropy > 0:  # scored against softmax(r/α*) at the α the run ended with
            from spo_ray.training.entropy_dial import dual_ascent_alpha

            last = steps[-1]
            alpha = dual_ascent_alpha(
                last["alpha"], cfg.loss.target_entropy, dial_entropy(last), cfg.loss.alpha_lr
            )
            tail = [dial_entropy(m) for m in steps[-20:]]
            whole = [m["entropy/response"] for m in steps[-20:]]
            best = empirical_optimum(task, rows, alpha)
            dial = {
                "entropy_target": cfg.loss.target_entropy,
                "alpha_final": alpha,
                "alpha_every_25_steps": [round(m["alpha"], 4) for m in steps[::25]],
                "entropy_min_prob": cfg.loss.entropy_min_prob,
                "online_entropy_last20": sum(tail) / len(tail),  # what the dial measured
                "online_whole_entropy_last20": sum(whole) / len(whole),
                "data_floor_tv_at_alpha_final": float(
                    (0.5 * (best - task.target_distribution(alpha)).abs().sum(-1)).mean()
                ),
            }
        metrics = evaluate(summary["final_model"], task, alpha, cfg.loss.beta, reference)
        step_seconds = sorted(m["step_seconds"] for m in steps[5:] if "step_seconds" in m)
        result["rows"][name] = {
            "label": label,
            "loss": cfg.loss.name,
            "alpha_target": alpha,
            "online": online,
            "kl_coef": cfg.loss.kl_coef,
            "kl_on": cfg.loss.kl_on,
            "beta": cfg.loss.beta,
            "tv_to_target": metrics["tv_to_target"],
            "tv_to_dpo_optimum": metrics["tv_to_dpo_optimum"],
            "entropy": metrics["entropy"],
            "target_entropy": metrics["target_entropy"],
            "mass_on_s": metrics["mass_on_s"],
            "expected_reward": metrics["expected_reward"],
            "target_expected_reward": metrics["target_expected_reward"],
            "kl_to_reference_on_s": metrics["kl_to_reference_on_s"],
            "distribution_on_s": metrics["distribution_on_s"],
            "median_step_seconds": step_seconds[len(step_seconds) // 2] if step_seconds else None,
            **degree_accuracy(steps),
            "wall_seconds": round(wall, 1),
            **dial,
        }
        print(
            name,
            json.dumps({k: v for k, v in result["rows"][name].items() if k != "distribution_on_s"}),
            flush=True,
        )
    if ray.is_initialized():
        ray.shutdown()
    result["task"] = {
        "prompts": task.prompts,
        "candidates": task.candidates,
        "rewards": task.rewards,
        "reference_on_s": reference.tolist(),
    }
    return result


def plot(result: dict, path: Path) -> Path:
    """One panel per method: learned π(y|x) on S (renormalized) against its target softmax(r/α), all 40
    candidates; the reference is drawn faintly against the same target. On the diagonal = converged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = torch.tensor(result["task"]["rewards"], dtype=torch.float64)
    reference = torch.tensor(result["task"]["reference_on_s"], dtype=torch.float64)
    reference = reference / reference.sum(-1, keepdim=True)
    rows = result["rows"]
    columns = min(3, len(rows))
    lines = -(-len(rows) // columns)
    figure, axes = plt.subplots(
        lines, columns, figsize=(3.3 * columns, 3.2 * lines), squeeze=False, layout="constrained"
    )
    for axis, (name, row) in zip(axes.flat, rows.items()):
        target = torch.softmax(rewards / row["alpha_target"], -1)
        learned = torch.tensor(row["distribution_on_s"], dtype=torch.float64)
        axis.plot([0, 1], [0, 1], color="#999999", lw=0.8)
        axis.scatter(target.flatten(), reference.flatten(), s=10, color="#cccccc", label="reference")
        axis.scatter(
            target.flatten(),
            learned.flatten(),
            s=14,
            color="#d62728" if "spo" in name else "#1f77b4",
            label="learned",
        )
        axis.set_title(f"{row['label']}\nTV {row['tv_to_target']:.3f}, H {row['entropy']:.2f}", fontsize=9)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel(f"softmax(r/{row['alpha_target']:g})", fontsize=8)
        axis.set_ylabel("π(y|x) on S", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(rows) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(
        "Synthetic expert task: learned distribution vs softmax(r/α) (diagonal = exact)", fontsize=10
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_bars(result: dict, path: Path, names: list[str]) -> Path:
    """The per-prompt bars of `spo_ray.eval.plots` for a few methods, on the first four prompts."""
    from spo_ray.eval.plots import plot_expert_distributions

    rows = result["rows"]
    rewards = torch.tensor(result["task"]["rewards"], dtype=torch.float64)
    learned = {rows[n]["label"]: torch.tensor(rows[n]["distribution_on_s"])[:4] for n in names if n in rows}
    reference = torch.tensor(result["task"]["reference_on_s"], dtype=torch.float64)[:4]
    return plot_expert_distributions(
        learned,
        torch.softmax(rewards / 1.0, -1)[:4],
        reference / reference.sum(-1, keepdim=True),
        path,
        title="Learned distributions on S(x) vs the expert softmax(r) (α=1) and the reference",
        prompt_labels=result["task"]["prompts"][:4],
        candidate_labels=[c for c in result["task"]["candidates"][:4]],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--out", default=str(OUT / "quality.json"))
    parser.add_argument("--plot-dir", default=str(BENCH_DIR))
    parser.add_argument(
        "--work-dir", default=str(OUT / "quality"), help="the runs' folders (one per bench run)"
    )
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or [n for n in METHODS if n not in ONLY_ON_REQUEST]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    result = run(names, args.set, Path(args.work_dir).resolve())
    write_json(Path(args.out), result)
    plot(result, Path(args.plot_dir) / "quality_vs_target.png")
    plot_bars(
        result,
        Path(args.plot_dir) / "quality_distributions.png",
        ["spo_a1", "spo_a1_online", "dpo_b0.1", "dpo_b1", "ipo_b0.1"],
    )


if __name__ == "__main__":
    main()
