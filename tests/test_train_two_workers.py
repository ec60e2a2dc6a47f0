"""Two Ray Train workers (DDP over gloo) with online vLLM samples: the lag bound holds on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_ray.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_two_workers_train_online_with_every_ranks_samples_from_the_synced_weights(ray_runtime, tmp_path):
    from spo_ray.train.job import run_job

    out = tmp_path / "two"
    cfg = load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [
            "task.num_pairs=400",
            "task.reference_fit_steps=30",
            "train.num_workers=2",
            "train.batch_size=4",
            "train.max_steps=4",
            "train.checkpoint_every=0",
            "train.warmup_steps=1",
            "rollout.prompts_per_step=2",
            "rollout.max_tokens=8",
            "rollout.overlap=false",  # each step's samples must come from the weights synced after the last
            "rollout.max_policy_lag=0",
            "logging.progress=false",
            f"output.dir={out}",
        ],
    )
    summary = run_job(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["policy_lag"] == 0 for r in rows)  # the worst rank's lag, every step
    assert all(r["rollout_logp_gap"] < 1e-3 for r in rows)  # both ranks sampled the synced weights
    # 4 examples per rank per step, no row twice: the global count of consumed examples
    assert [r["data_consumed"] for r in rows] == [8, 16, 24, 32]
