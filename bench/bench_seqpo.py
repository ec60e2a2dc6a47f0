"""Sequential PO on the synthetic expert task with two known reward tables r1 and r2.

Run: `.venv/bin/python bench/bench_seqpo.py [--steps N] [--beta B] [--lam L]`.
The tiny reference π_0 is fitted once to the task's non-uniform q (as in bench_quality.py). Dimension r1's
pairs are Bradley–Terry on the task's rewards, dimension r2's on a second, independent table over the same
candidates; both go into one file, each row labelled with its `dimension`. `spo-ray stages` (run_stages)
trains stage 1 on r1 and stage 2 on r2 from stage 1's model with `loss.name=seqpo`; a second run trains
r2 alone from π_0 (DPO, the same β and steps). Each model is evaluated exactly on S(x) (renormalized) and
compared, by TV averaged over prompts, with the paper's closed-form optimum

    π_2 ∝ π_1·exp((r2 + λ·r1)/β),  π_1 ∝ π_0·exp(r1/β),  i.e.  π_2 ∝ π_0·exp(((1+λ)·r1 + r2)/β).

Writes bench/out/seqpo.json and merges its `seqpo_*` keys into bench/results.json.
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
from common import BENCH_DIR, OUT, REPO, read_json, write_json  # noqa: E402

CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((0.5 * (p - q).abs().sum(-1)).mean())


def _on_s(model_dir: str, task) -> tuple[torch.Tensor, float]:
    from spo_ray.tasks.synthetic_expert.evaluate import model_distribution_on_s

    probs = model_distribution_on_s(model_dir, task)
    return probs / probs.sum(-1, keepdim=True), float(probs.sum(-1).mean())


def run(steps: int, beta: float, lam: float, num_pairs: int, out_dir: Path) -> dict:
    import ray

    from spo_ray.config import load_config
    from spo_ray.iterative.stages import run_stages
    from spo_ray.tasks.synthetic_expert import job as expert_job
    from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask
    from spo_ray.training.runner import run_training

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
    task_root = out_dir / "task_root"
    common = ["logging.progress=false", "logging.wandb_mode=disabled", "train.checkpoint_every=0"]
    base = load_config(CONFIG, common + [f"output.dir={out_dir / 'base'}"])
    expert_job.prepare(base, task_root)  # the task and π_0 fitted to its q (reused when present)
    task1 = SyntheticExpertTask.load(task_root / "task" / "task.json")
    other = SyntheticExpertTask.build(
        seed=1, num_prompts=task1.num_prompts, num_candidates=task1.num_candidates
    )
    task2 = SyntheticExpertTask(task1.prompts, task1.candidates, other.rewards, task1.reference, seed=1)
    pi0_dir = str(task_root / "expert_reference")

    data = out_dir / "two_dimensions.jsonl"
    rows = [{**r, "dimension": "r1"} for r in task1.sample_pairs(num_pairs, rng_seed=11)]
    rows += [{**r, "dimension": "r2"} for r in task2.sample_pairs(num_pairs, rng_seed=12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    shared = common + [
        "task.name=none",
        f"data.train_files=[{data}]",
        "loss.kl_coef=0",
        f"loss.beta={beta}",
        f"train.max_steps={steps}",
    ]
    staged_dir, alone_dir = out_dir / "stages", out_dir / "r2_alone"
    for folder in (staged_dir, alone_dir):
        shutil.rmtree(folder, ignore_errors=True)  # a run dir with a finished stage would skip it
    started = time.perf_counter()
    staged = run_stages(
        load_config(
            CONFIG,
            shared
            + [
                f"model.path={pi0_dir}",
                "loss.name=seqpo",
                f"loss.seqpo_lambda={lam}",
                "stages.dimensions=[r1,r2]",
                f"output.dir={staged_dir}",
            ],
        )
    )
    staged_seconds = time.perf_counter() - started
    started = time.perf_counter()
    alone = run_training(
        load_config(
            CONFIG,
            shared
            + [
                f"model.path={pi0_dir}",
                "loss.name=dpo",
                "data.dimension=r2",
                f"output.dir={alone_dir}",
            ],
        )
    )
    alone_seconds = time.perf_counter() - started
    if ray.is_initialized():
        ray.shutdown()

    q0, _ = _on_s(pi0_dir, task1)
    lq0 = q0.log()
    r1, r2 = task1.reward_tensor(), task2.reward_tensor()
    target_1 = torch.softmax(lq0 + r1 / beta, -1)
    closed_form = torch.softmax(lq0 + ((1 + lam) * r1 + r2) / beta, -1)
    alone_optimum = torch.softmax(lq0 + r2 / beta, -1)
    pi1, mass1 = _on_s(staged["stages"][0]["model"], task1)
    pi2, mass2 = _on_s(staged["stages"][1]["model"], task1)
    pi_alone, mass_alone = _on_s(alone["final_model"], task1)
    # the optimum of stage 2 given the stage-1 model actually reached: π_1·exp((r2 + λ·r1)/β)
    from_reached = torch.softmax(pi1.log() + (r2 + lam * r1) / beta, -1)
    result = {
        "settings": {"steps_per_stage": steps, "beta": beta, "lambda": lam, "pairs_per_dimension": num_pairs},
        "tv_stage1_to_its_optimum": _tv(pi1, target_1),
        "tv_both_stages_to_closed_form": _tv(pi2, closed_form),
        "tv_both_stages_to_optimum_from_reached_stage1": _tv(pi2, from_reached),
        "tv_r2_alone_to_closed_form": _tv(pi_alone, closed_form),
        "tv_r2_alone_to_its_own_optimum": _tv(pi_alone, alone_optimum),
        "tv_reference_to_closed_form": _tv(q0, closed_form),
        "mass_on_s": {"stage1": mass1, "stage2": mass2, "r2_alone": mass_alone},
        "expected_r1": {
            "reference": float((q0 * r1).sum(-1).mean()),
            "stage1": float((pi1 * r1).sum(-1).mean()),
            "stage2": float((pi2 * r1).sum(-1).mean()),
            "r2_alone": float((pi_alone * r1).sum(-1).mean()),
            "closed_form": float((closed_form * r1).sum(-1).mean()),
        },
        "expected_r2": {
            "reference": float((q0 * r2).sum(-1).mean()),
            "stage1": float((pi1 * r2).sum(-1).mean()),
            "stage2": float((pi2 * r2).sum(-1).mean()),
            "r2_alone": float((pi_alone * r2).sum(-1).mean()),
            "closed_form": float((closed_form * r2).sum(-1).mean()),
        },
        "wall_seconds": {"stages": round(staged_seconds, 1), "r2_alone": round(alone_seconds, 1)},
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per stage (and of r2 alone)")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--pairs", type=int, default=16000, help="Bradley–Terry pairs per dimension")
    parser.add_argument("--out", default=str(OUT / "seqpo.json"))
    args = parser.parse_args()
    result = run(args.steps, args.beta, args.lam, args.pairs, OUT / "seqpo")
    write_json(Path(args.out), result)
    merged = read_json(BENCH_DIR / "results.json") or {}
    merged["seqpo_tv_to_closed_form"] = result["tv_both_stages_to_closed_form"]
    merged["seqpo_tv_r2_alone_to_closed_form"] = result["tv_r2_alone_to_closed_form"]
    merged["seqpo"] = result
    write_json(BENCH_DIR / "results.json", merged)


if __name__ == "__main__":
    main()
