"""Two Ray Train workers (DDP over gloo) with online vLLM samples, SIGKILLed mid-run and re-run: the lag bound
holds on every rank, and across the two shards every step trains exactly the next rows of the epoch's
permutation, none repeated or skipped, as the rows' ids in each rank's trace show. The run carries the
degree head of loss.sspo_lambda (its own gradient all-reduce, checkpoint file and restore)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from faults import run_until

from spo_ray.data.permutation import derive_key, permute
from spo_ray.training.metrics import read_row_trace

pytestmark = pytest.mark.slow

WORKERS, BATCH, STEPS = 2, 4, 6
TWO_WORKERS_ONLINE = [  # on top of faults.FAULT_RUN: a checkpoint every 2 steps, each rank's rows traced
    "loss.kl_coef=0.02",
    f"train.num_workers={WORKERS}",
    f"train.batch_size={BATCH}",
    f"train.max_steps={STEPS}",
    "rollout.prompts_per_step=2",
    "rollout.max_tokens=8",
    "rollout.overlap=false",  # each step's samples must come from the weights synced after the last
    "rollout.max_policy_lag=0",
    "data.eval_fraction=0.1",  # 16 of the 160 rows held out, evaluated every 2 steps by both ranks
    "train.eval_every=2",
    "logging.samples_every=3",
    "loss.sspo_lambda=0.1",  # the degree head: grads all-reduced across ranks, its file saved and restored
]


def test_two_workers_killed_mid_run_resume_on_exactly_the_next_rows_with_samples_from_the_synced_weights(
    tmp_path,
):
    out, log = tmp_path / "two", tmp_path / "runs.log"
    killed = run_until(out, "mid_step_after_a_checkpoint", log, 900, *TWO_WORKERS_ONLINE)
    assert killed["killed"] and killed["step"] < STEPS, killed
    summary = run_until(out, None, log, 900, *TWO_WORKERS_ONLINE)["summary"]
    assert summary["steps"] == STEPS and summary["resumed_from_step"] >= 2, summary

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["policy_lag"] == 0 for r in rows)  # the worst rank's lag, every step
    assert all(r["rollout_logp_gap"] < 1e-3 for r in rows)  # both ranks sampled the synced weights
    assert all(0 <= r["sspo_acc"] <= 1 and np.isfinite(r["sspo_loss"]) for r in rows)
    assert all(0 <= r["eval/sspo_acc"] <= 1 for r in rows if "eval/rows" in r)
    manifests = [json.loads(p.read_text()) for p in (out / "checkpoints").rglob("manifest.json")]
    assert manifests and all("degree_head.pt" in m["files"] for m in manifests)
    # each rank evaluated its half of the held-out rows, each row counted once; the killed run's lines past
    # its checkpoint were dropped on resume, for samples.jsonl as for metrics.jsonl
    assert [r["step"] for r in rows if "eval/rows" in r] == [2, 4, 6]
    assert all(r["eval/rows"] == 16 for r in rows if "eval/rows" in r) and summary["eval"]["eval/rows"] == 16
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [3] * 4 + [6] * 4  # rank 0's 2 prompts x 2 samples, every 3 steps
    assert all(s["policy_version"] == s["step"] - 1 and s["completion"].strip() for s in samples)

    # the ids each rank trained on, against the epoch order the data's seed fixes (spo_ray/data/permutation.py)
    config = json.loads((out / "config.json").read_text())
    n = summary["data"]["num_train"]
    order = np.argsort(permute(np.arange(n), n, derive_key(config["data"]["shuffle_seed"], "epoch", 0)))
    traces = [read_row_trace(out, rank) for rank in range(WORKERS)]
    per_step = WORKERS * BATCH
    for step in range(1, STEPS + 1):
        trained = sorted(traces[0][step] + traces[1][step])
        expected = sorted(order[per_step * (step - 1) : per_step * step].tolist())
        assert trained == expected, f"step {step} (killed at step {killed['step']}): {trained} vs {expected}"
