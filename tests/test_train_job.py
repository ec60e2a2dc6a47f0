"""The end-to-end job on real Ray Train + real vLLM CPU rollout: summary, final model, resume, crash recovery."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from ray_cluster import LocalRayCluster, cluster_env

from spo_ray.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# A small online SPO run on the synthetic expert task: a few steps, checkpoints every 3.
SMALL = [
    "task.num_pairs=400",
    "task.reference_fit_steps=30",
    "train.batch_size=8",
    "train.checkpoint_every=3",
    "train.warmup_steps=1",
    "rollout.prompts_per_step=2",
    "rollout.samples_per_prompt=1",
    "rollout.max_tokens=8",
    "logging.progress=false",
]


def small_config(out_dir, *extra):
    return load_config(REPO / "configs" / "tiny_cpu.yaml", [*SMALL, f"output.dir={out_dir}", *extra])


def metric_rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_positions_continue_without_repeats_or_skips(rows, pairs_per_step):
    """Each step consumed exactly the next `pairs_per_step` examples of the epoch stream."""
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    consumed = [r["data_consumed"] for r in rows]
    assert consumed == [pairs_per_step * (i + 1) for i in range(len(rows))], consumed


def test_online_spo_job_writes_summary_and_final_model_then_resumes(ray_runtime, tmp_path):
    from transformers import AutoModelForCausalLM

    from spo_ray.tasks import run_job

    out = tmp_path / "run"
    # overlap off: samples come from exactly the weights synced after the previous step (lag 0)
    first = run_job(small_config(out, "train.max_steps=6", "rollout.overlap=false", *EVAL_AND_SAMPLES))
    assert first["steps"] == 6 and first["resumed_from_step"] == 0
    assert first["bad_rows"] == {} and first["data"]["num_train"] == 360 and first["data"]["num_eval"] == 40
    assert first["wall_seconds"] > 0 and first["expert_tv_after"] != first["expert_tv_before"]  # it trained
    assert first["entropy_before"] > 0 and 0 < first["mass_on_s_after"] <= 1
    last = first["final_metrics"]
    assert last["step"] == 6 and last["pairs_per_s"] == pytest.approx(8 / last["step_seconds"])
    assert first["pairs_per_second"] == pytest.approx(
        sum(r["pairs_per_s"] for r in metric_rows(out)) / 6, rel=1e-3
    )
    # the global KL on online samples: exact token KL and k3 are never negative; samples have tokens
    assert last["kl_token"] >= 0 and last["kl_k3"] >= 0 and last["sample_tokens"] > 0
    assert last["sample_entropy"] > 0 and last["pref_loss"] > 0
    assert 0 < last["kl_forward_seconds"] < last["step_seconds"]  # the KL forwards' own time, within the step
    assert 0 <= last["data_wait_frac"] + last["gen_wait_frac"] <= 1
    assert last["policy_lag"] == 0
    # rollout log-probs of the sampled tokens match the trainer's: the weights really were synced
    assert last["rollout_logp_gap"] < 1e-3
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.model_type == "llama"
    assert (out / "distributions.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0

    second = run_job(small_config(out, "train.max_steps=9", "rollout.overlap=false", *EVAL_AND_SAMPLES))
    assert second["resumed_from_step"] == 6 and second["steps"] == 9
    rows = metric_rows(out)
    assert_positions_continue_without_repeats_or_skips(rows, pairs_per_step=8)

    # evaluation every 4 steps and after the last step of each run, on all 40 held-out rows
    evals = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows}
    assert [step for step, e in evals.items() if e] == [4, 6, 8, 9]
    assert all(evals[step]["eval/rows"] == 40 for step in (4, 6, 8, 9))
    assert first["eval"] == evals[6] and second["eval"] == evals[9]
    assert all("logps/chosen" in r and "entropy/samples" in r and r["kl/samples"] >= 0 for r in rows)
    # rollout.async_sync (the default): each step queues its sync and logs the last one that completed, so the
    # first step of a fresh run has none yet, and the first after the resume reports the resume's waited sync
    assert rows[0]["sync_bytes"] == 0 and all(
        r["sync_bytes"] > 0 and r["sync_load_seconds"] > 0 for r in rows[1:]
    )
    # loss.target_entropy: every step logs the α it used; the next step's is one dual-ascent step on from it,
    # across the resume too (step 7 starts from the α saved with step 6's checkpoint)
    from spo_ray.training.entropy_dial import dual_ascent_alpha

    assert rows[0]["alpha"] == 1.0 and all(r["entropy/response"] > 0 for r in rows)
    # every sample counts as likely, so the measured entropy is the Monte-Carlo one, mean of −lp_θ(y)
    assert all(r["entropy/likely_fraction"] == 1.0 for r in rows)
    assert all(r["entropy/measured"] == pytest.approx(r["sample_entropy"], rel=1e-6) for r in rows)
    for before, after in zip(rows, rows[1:]):
        expected = dual_ascent_alpha(before["alpha"], 0.5, before["entropy/measured"], 0.005)
        assert after["alpha"] == pytest.approx(expected, rel=1e-6)
    assert len({round(r["alpha"], 6) for r in rows}) == len(rows)  # it moved every step
    # the final evaluation is the TRL metrics of the final model against the reference on the eval rows
    direct = eval_metrics_of(out / "final", json.loads((out / "config.json").read_text()), out)
    for name, value in direct.items():
        assert second["eval"][f"eval/{name}"] == pytest.approx(value, abs=1e-4), name

    # samples.jsonl: every 2 steps, 2 samples generated from the weights synced after the step before
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert all(s["policy_version"] == s["step"] - 1 and s["completion"].strip() for s in samples)
    assert all(s["prompt"].strip() for s in samples)


EVAL_AND_SAMPLES = [
    "data.eval_fraction=0.1",
    "train.eval_every=4",
    "logging.samples_every=2",
    "logging.num_samples=2",
    "loss.target_entropy=0.5",  # α adapts each step (loss.alpha_lr), checkpointed with the state
    "loss.alpha_lr=0.005",  # small enough that α never reaches its clamp in 9 steps
    # an untrained model's samples are each rarer than the default 0.01: this floor counts every one of them
    "loss.entropy_min_prob=1e-300",
]


def eval_metrics_of(model_dir, config: dict, out) -> dict[str, float]:
    """TRL's eval metrics computed directly: each held-out row's responses scored by the model and the reference."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from spo_ray.config import config_from_dict
    from spo_ray.data import collate_preference_batch, prepare_preference_data, response_logps

    cfg = config_from_dict(config)
    prepared = prepare_preference_data(cfg.data, cfg.model.path, str(out))  # the run's cached parts
    table = prepared.eval_rows.read(np.arange(prepared.num_eval))
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    batch = collate_preference_batch(rows, prepared.pad_token_id)
    logps = []
    for path in (model_dir, cfg.model.path):  # the final policy, then the reference (the run's start)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        with torch.no_grad():
            logps.append(response_logps(model(**batch.model_inputs()).logits, batch).view(-1, 2))
    policy, reference = logps
    assert (batch.ranking[:, 0] == 0).all()  # pairwise rows: column 0 is the chosen response
    rewards = cfg.loss.beta * (policy - reference)
    return {
        "rewards/chosen": rewards[:, 0].mean().item(),
        "rewards/rejected": rewards[:, 1].mean().item(),
        "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean().item(),
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).double().mean().item(),
        "logps/chosen": policy[:, 0].mean().item(),
        "logps/rejected": policy[:, 1].mean().item(),
    }


def _kill_train_worker_after(out_dir: Path, step: int, killed: list) -> None:
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            done = max((r["step"] for r in metric_rows(out_dir)), default=0)
        except (FileNotFoundError, json.JSONDecodeError):
            done = 0
        if done >= step:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
            return
        time.sleep(0.2)


def test_killed_train_worker_restarts_from_latest_checkpoint_and_finishes(ray_runtime, tmp_path):
    from spo_ray.tasks import run_job

    out = tmp_path / "crash"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_train_worker_after, args=(out, 4, killed), daemon=True)
    killer.start()
    summary = run_job(small_config(out, "train.max_steps=8", "loss.kl_coef=0", "train.max_failures=2"))
    killer.join(timeout=5)
    assert killed, "no Ray Train worker process was found to kill"
    assert summary["steps"] == 8
    # the restarted group resumed from the step-3 checkpoint; metrics past it were rewritten once
    assert_positions_continue_without_repeats_or_skips(metric_rows(out), pairs_per_step=8)


VLLM_INFO = re.compile(
    r"\) INFO \d\d-\d\d "
)  # vLLM's format: "(MainProcess pid=1) INFO 12-03 07:03:48 [...]"


def test_verbose_cli_shows_the_library_lines_a_default_run_hides(tmp_path):
    """`spo-ray --verbose`: every library line, the known-benign weight-reload warning included (vLLM logs it
    when it reloads, so with `rollout.cpu_weights=packed`; in place it has nothing to say)."""
    settings = [*SMALL, "train.max_steps=2", "rollout.cpu_weights=packed"]
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    command = [sys.executable, "-m", "spo_ray.cli", "--verbose", "train", "--config", "configs/tiny_cpu.yaml"]
    done = subprocess.run(
        [*command, "--output-dir", str(tmp_path / "run"), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    # in a full suite an earlier in-process quiet run had left VLLM_LOGGING_CONFIG_PATH (WARNING) in the environment
    assert VLLM_INFO.search(output) and "Failed to load weights" in output, output[-8000:]
    assert "Requesting resources" in output  # Ray Train's controller


def test_ray_job_submit_runs_the_tiny_job_on_a_local_head(tmp_path):
    """The README's command as written, on a head started with a PATH that lacks the project's venv: the
    job's `python` is then another interpreter, and jobs/train_spo.py re-runs with the cluster's own."""
    bin_dir = Path(sys.executable).parent
    other_dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != bin_dir]
    cluster = LocalRayCluster(tmp_path, env=cluster_env(path_dirs=other_dirs))
    out = tmp_path / "job_out"
    # packed CPU weights: every sync reloads, and vLLM logs the benign reload warning the quiet console drops
    settings = [*SMALL, "train.max_steps=4", "rollout.cpu_weights=packed"]
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    entrypoint = [
        "python",
        "jobs/train_spo.py",
        "--config",
        "configs/tiny_cpu.yaml",
        "--output-dir",
        str(out),
    ]
    try:
        cluster.start_head(num_cpus=4)
        done = cluster.submit([*entrypoint, *overrides], submission_id="tiny-job")
        head_output = cluster.nodes[0].log.read_text()[-2000:]
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + "\nray head: " + head_output
        assert "succeeded" in done.stdout.lower()
        assert f"re-running with {bin_dir / 'python'}" in done.stdout  # `python` was not the venv's
        # a quiet console by default (spo_ray/logs.py), also in the cluster's processes: no vLLM INFO lines,
        # no benign weight-reload warning, no Ray Train set-up lines (tests below: --verbose shows them)
        assert not VLLM_INFO.search(done.stdout) and "Failed to load weights" not in done.stdout
        assert "Requesting resources" not in done.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["expert_tv_after"] != summary["expert_tv_before"]
    finally:
        cluster.stop()
