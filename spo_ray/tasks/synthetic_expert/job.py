"""The synthetic expert task's job: write the task and a fitted reference, train, evaluate exactly, plot, tabulate."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from spo_ray.config import Config
from spo_ray.storage import local_output
from spo_ray.training.callbacks import Callback
from spo_ray.training.runner import run_training


def prepare(cfg: Config, out: Path) -> tuple[Config, object]:
    """Write the task, its preference data and a reference fitted to the task's non-uniform q (once, in `out`)."""
    from spo_ray.models.loading import resolve_model_dir
    from spo_ray.tasks.synthetic_expert.data import write_synthetic_expert_data
    from spo_ray.tasks.synthetic_expert.reference import fit_reference
    from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask

    t = cfg.task
    task_dir = out / "task"
    if (task_dir / "task.json").exists():
        task = SyntheticExpertTask.load(task_dir / "task.json")
    else:
        task = SyntheticExpertTask.build(
            seed=t.seed, num_prompts=t.num_prompts, num_candidates=t.num_candidates
        )
    paths = write_synthetic_expert_data(task_dir, task, t.num_pairs, t.seed)
    reference_dir = out / "expert_reference"
    if not (reference_dir / "config.json").exists():
        base = resolve_model_dir(cfg.model, out)
        fit = fit_reference(base, task, reference_dir, steps=t.reference_fit_steps, seed=t.seed)
        print(
            f"reference fitted to q: TV {fit['tv_to_reference']:.4f}, mass on S {fit['mass_on_s']:.3f}, {fit['seconds']:.1f}s"
        )
    model = dataclasses.replace(cfg.model, path=str(reference_dir), reference_path="")
    data = dataclasses.replace(
        cfg.data,
        train_files=[str(paths["preferences"])],
        reg_prompts_file=cfg.data.reg_prompts_file or str(paths["prompts"]),
    )
    return dataclasses.replace(cfg, model=model, data=data), task


def run_job(cfg: Config, callbacks: Sequence[Callback] = (), task_root: Path | None = None) -> dict:
    """Train on the synthetic expert task; `task_root` shares one task + fitted reference between runs."""
    import torch

    from spo_ray.eval.plots import plot_curves, plot_expert_distributions
    from spo_ray.tasks.synthetic_expert.evaluate import expert_metrics, model_distribution_on_s
    from spo_ray.training.metrics import read_metrics

    out = local_output(cfg.output.dir, "task.name=synthetic_expert (its evaluation and plots)")
    out.mkdir(parents=True, exist_ok=True)
    cfg, task = prepare(cfg, task_root or out)
    alpha, beta = cfg.loss.alpha, cfg.loss.beta
    reference = model_distribution_on_s(cfg.model.path, task)  # [P, K]: the starting policy is the reference
    before = expert_metrics(reference, task, alpha, beta=beta, reference=reference)
    summary = run_training(cfg, callbacks=callbacks)
    after = expert_metrics(
        model_distribution_on_s(summary["final_model"], task), task, alpha, beta=beta, reference=reference
    )
    plot_expert_distributions(
        torch.tensor(after["distribution_on_s"]),
        task.target_distribution(alpha),
        torch.tensor(before["distribution_on_s"]),  # the reference, renormalized on S like the others
        out / "distributions.png",
        title=f"{cfg.loss.name} (alpha={alpha}): learned vs softmax(r/alpha) vs reference",
    )
    plot_curves(read_metrics(out), ["pref_loss", "kl_k1", "kl_k3", "accuracy"], out / "curves.png")
    summary.update(
        expert_tv_before=before["tv_to_target"],
        expert_tv_after=after["tv_to_target"],
        entropy_before=before["entropy"],
        entropy_after=after["entropy"],
        target_entropy=after["target_entropy"],
        mass_on_s_before=before["mass_on_s"],
        mass_on_s_after=after["mass_on_s"],
        expected_reward_before=before["expected_reward"],
        expected_reward_after=after["expected_reward"],
        tv_to_dpo_optimum_after=after.get("tv_to_dpo_optimum"),
        plots=[str(out / "distributions.png"), str(out / "curves.png")],
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_expert_table([summary], [cfg.loss.name]))
    return summary


def format_expert_table(summaries: list[dict], names: list[str]) -> str:
    """A short console table: TV to softmax(r/alpha), entropy and mass on S, before -> after."""
    lines = [
        f"{'run':<12} {'TV before':>10} {'TV after':>10} {'entropy':>16} {'mass on S':>10} {'steps':>6} {'wall s':>7}"
    ]
    for name, s in zip(names, summaries):
        lines.append(
            f"{name:<12} {s['expert_tv_before']:>10.4f} {s['expert_tv_after']:>10.4f} "
            f"{s['entropy_before']:>7.3f}->{s['entropy_after']:<7.3f} {s['mass_on_s_after']:>10.3f} "
            f"{s['steps']:>6} {s['wall_seconds']:>7.1f}"
        )
    return "\n".join(lines)
