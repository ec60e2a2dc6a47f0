"""Real Ray Train runs: offline throughput (1 and 2 workers) and the cost of going online.

Run: `.venv/bin/python bench/bench_online.py [--only ray,online] [--steps 40]`.

- `ray`: `run_training` (what `spo-ray train` calls) on the tiny model with the same conversational pairs,
  batch and max_length as bench_train.py's tiny row, offline (`loss.kl_coef=0`): SPO and DPO with 1 worker,
  SPO with 2 workers (DDP over gloo). The in-process step of bench_train.py minus this is Ray's overhead.
- `online`: the synthetic expert task (configs/tiny_cpu.yaml): SPO offline vs SPO online with the global
  KL on samples from a vLLM rollout actor (synced every step): with generation overlap and the queued sync
  (`rollout.async_sync`, the default), with overlap and a waiting sync (the behaviour before it), and
  without overlap.

Per-step figures are medians over the steady steps (the first `WARMUP` are dropped) of each run's
metrics.jsonl; each step is one repetition. Step time is split into generation wait, data wait, weight
sync and the rest (collate, forwards, backward, optimizer, logging).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SETTINGS  # noqa: E402
from common import OUT, REPO, conversational_pairs, median, tiny_model_dir, write_json  # noqa: E402

CONFIG = REPO / "configs" / "tiny_cpu.yaml"
WARMUP = 5
COMMON = ["logging.progress=false", "logging.wandb_mode=disabled", "train.checkpoint_every=0"]


def ensure_ray(num_cpus: int) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, num_cpus),
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )


def step_profile(run_dir: Path, pairs_per_step: int) -> dict:
    """Medians over steady steps: seconds per step, pairs/s, and where the time went."""
    from spo_ray.training.metrics import read_metrics

    rows = [m for m in read_metrics(run_dir) if "step_seconds" in m][WARMUP:]
    steps = [m["step_seconds"] for m in rows]
    gen = [m["step_seconds"] * m.get("gen_wait_frac", 0.0) for m in rows]
    data = [m["step_seconds"] * m.get("data_wait_frac", 0.0) for m in rows]
    # the time the trainer was held by the sync: gather, put and queue, or the wait
    sync = [m.get("sync_seconds", 0.0) for m in rows]
    rest = [s - g - d - y for s, g, d, y in zip(steps, gen, data, sync)]
    step = median(steps)
    return {
        "steady_steps": len(rows),
        "step_seconds": step,
        "pairs_per_s": pairs_per_step / step,
        "gen_wait_seconds": median(gen),
        "data_wait_seconds": median(data),
        "sync_seconds": median(sync),
        "compute_seconds": median(rest),
        "kl_forward_seconds": median(m.get("kl_forward_seconds", 0.0) for m in rows),
        # engine side: a sync's queuing to every engine serving it (off the trainer's path with async_sync)
        "sync_load_seconds": median(m.get("sync_load_seconds", 0.0) for m in rows),
        "policy_lag": median(m.get("policy_lag", 0.0) for m in rows),
        "step_seconds_all": steps,
    }


def ray_runs(steps: int, out_dir: Path, cpus_per_worker: int) -> dict:
    """Offline `run_training` on bench_train.py's tiny data: SPO and DPO on 1 worker with `cpus_per_worker`
    CPUs (torch threads), SPO on 2 workers with 1 CPU each: the same cores, split between two DDP ranks."""
    from spo_ray.config import load_config
    from spo_ray.training.runner import run_training

    settings = SETTINGS["tiny"]
    batch = settings["batch"]
    data = out_dir / "pairs.jsonl"
    rows = conversational_pairs(
        batch * 2 * (steps + 2), 0, settings["prompt_words"], settings["response_words"]
    )
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ensure_ray(max(2, cpus_per_worker) + 2)
    results = {}
    for name, loss, workers in (("spo_1w", "spo", 1), ("dpo_1w", "dpo", 1), ("spo_2w", "spo", 2)):
        cpus = cpus_per_worker if workers == 1 else 1
        overrides = COMMON + [
            "task.name=none",
            f"model.path={tiny_model_dir()}",
            f"data.train_files=[{data}]",
            "data.eval_fraction=0",
            "data.on_bad_rows=skip",  # the few rows over max_length (TRL would truncate them) stay out
            f"data.max_length={settings['max_length']}",
            f"data.max_prompt_length={settings['max_length'] // 2}",
            f"loss.name={loss}",
            "loss.kl_coef=0",
            f"loss.beta={0.1}",
            f"train.num_workers={workers}",
            f"train.cpus_per_worker={cpus}",
            f"train.batch_size={batch}",
            f"train.max_steps={steps}",
            f"output.dir={out_dir / name}",
        ]
        cfg = load_config(CONFIG, overrides)
        shutil.rmtree(
            out_dir / name, ignore_errors=True
        )  # a run dir with checkpoints would resume, not train
        started = time.perf_counter()
        summary = run_training(cfg)
        profile = step_profile(out_dir / name, batch * workers)
        profile.update(
            workers=workers,
            cpus_per_worker=cpus,
            loss=loss,
            wall_seconds=time.perf_counter() - started,
            summary_pairs_per_s=summary["pairs_per_second"],
            bad_rows=summary.get("bad_rows"),
        )
        results[name] = profile
        print(name, json.dumps({k: v for k, v in profile.items() if k != "step_seconds_all"}), flush=True)
    results["scaling_2w_over_1w_pairs_per_s"] = (
        results["spo_2w"]["pairs_per_s"] / results["spo_1w"]["pairs_per_s"]
    )
    return results


def online_runs(steps: int, out_dir: Path, task_root: Path) -> dict:
    """SPO on the synthetic expert task: offline, online with overlap, online without overlap."""
    from spo_ray.config import load_config
    from spo_ray.tasks.synthetic_expert import job as expert_job
    from spo_ray.training.runner import local_cpus_needed, run_training

    base = load_config(CONFIG, COMMON + [f"train.max_steps={steps}"])
    ensure_ray(local_cpus_needed(base))
    results = {}
    variants = (
        ("offline", ["loss.kl_coef=0"]),
        ("online_overlap", ["rollout.overlap=true", "rollout.async_sync=true"]),
        ("online_overlap_wait_sync", ["rollout.overlap=true", "rollout.async_sync=false"]),
        ("online_no_overlap", ["rollout.overlap=false", "rollout.async_sync=true"]),
    )
    for name, overrides in variants:
        cfg = load_config(
            CONFIG,
            COMMON
            + [f"train.max_steps={steps}", "loss.name=spo", f"output.dir={out_dir / name}", *overrides],
        )
        cfg, _ = expert_job.prepare(cfg, task_root)  # shared task, pairs and fitted reference
        shutil.rmtree(
            out_dir / name, ignore_errors=True
        )  # a run dir with checkpoints would resume, not train
        started = time.perf_counter()
        run_training(cfg)
        profile = step_profile(out_dir / name, cfg.train.batch_size * cfg.train.num_workers)
        profile.update(
            wall_seconds=time.perf_counter() - started, kl_coef=cfg.loss.kl_coef, rollout=cfg.rollout.backend
        )
        results[name] = profile
        print(name, json.dumps({k: v for k, v in profile.items() if k != "step_seconds_all"}), flush=True)
    offline = results["offline"]["step_seconds"]
    results["online_overhead_ratio"] = results["online_overlap"]["step_seconds"] / offline
    results["online_overhead_ratio_no_overlap"] = results["online_no_overlap"]["step_seconds"] / offline
    # issue 15's floor: the offline step plus the KL forwards' own compute, timed inside the online run's steps
    suffixes = {
        "online_overlap": "",
        "online_overlap_wait_sync": "_wait_sync",
        "online_no_overlap": "_no_overlap",
    }
    for name, suffix in suffixes.items():
        run = results[name]
        floor = offline + run["kl_forward_seconds"]
        run["compute_floor_seconds"] = floor
        run["over_floor"] = {  # where the time above the floor goes, seconds per step (medians)
            "generation_wait": run["gen_wait_seconds"],
            "weight_sync": run["sync_seconds"],
            "data_wait_beyond_offline": run["data_wait_seconds"] - results["offline"]["data_wait_seconds"],
            "compute_beyond_floor": run["compute_seconds"]
            - results["offline"]["compute_seconds"]
            - run["kl_forward_seconds"],  # the KL backward, sample collation, the step's other online work
        }
        results["online_overhead_vs_compute_floor" + suffix] = run["step_seconds"] / floor
    results["settings"] = {
        "config": str(CONFIG.relative_to(REPO)),
        "batch_size": base.train.batch_size,
        "steps": steps,
        "kl_coef": base.loss.kl_coef,
        "prompts_per_step": base.rollout.prompts_per_step,
        "samples_per_prompt": base.rollout.samples_per_prompt,
        "max_tokens": base.rollout.max_tokens,
        "sync_every": base.rollout.sync_every,
        "backend": base.rollout.backend,
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="ray,online")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument(
        "--cpus-per-worker", type=int, default=2, help="section ray: CPUs of the 1-worker runs"
    )
    parser.add_argument("--out", default=str(OUT / "online.json"))
    args = parser.parse_args()
    sections = args.only.split(",")
    result = {}
    if "ray" in sections:
        result["ray"] = ray_runs(args.steps, OUT / "ray_runs", args.cpus_per_worker)
    if "online" in sections:
        result["online"] = online_runs(args.steps, OUT / "online_runs", OUT / "quality" / "task_root")
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
