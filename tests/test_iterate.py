"""`spo-ray iterate` end to end on the synthetic expert task: real Ray Train, real vLLM, real judge."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from spo_ray.config import load_config
from spo_ray.iterate import run_iterate

pytestmark = pytest.mark.slow

SMALL = [
    "task.name=synthetic_expert",
    "task.num_prompts=4",
    "task.num_candidates=4",
    "task.num_pairs=16",
    "task.reference_fit_steps=150",
    "model.path=tiny",
    "judge.name=synthetic_expert",
    "iterate.prompts_per_round=4",
    "iterate.candidates_per_prompt=16",
    "iterate.max_tokens=12",
    "iterate.eval_prompts=4",
    "iterate.eval_samples=4",
    "rollout.max_tokens=12",
    "rollout.prompts_per_step=2",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (Ray's head, workers, engines)."""
    parent = psutil.Process(process.pid)
    family = [parent, *parent.children(recursive=True)]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(family, timeout=30)


def test_iterative_spo_killed_mid_round_resumes_and_improves_round_over_round(ray_runtime, tmp_path):
    out = tmp_path / "iterate"
    overrides = [
        *SMALL,
        "iterate.rounds=2",
        "iterate.steps_per_round=16",
        "iterate.candidates_per_prompt=32",  # ~1,500 pairs a round: 16 x 32 pairs see each once at most
        "iterate.replay_rounds=1",  # round 2 trains on round 1's rows too
        "iterate.lr_decay=0.8",
        "loss.name=spo",
        "loss.kl_coef=0.1",
        "train.batch_size=32",
        "train.lr=1e-3",
        "train.checkpoint_every=4",
        f"output.dir={out}",
    ]
    args = [sys.executable, "-m", "spo_ray.cli", "iterate"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / "rounds" / "round_1" / "train" / "checkpoints" / "ray_train"
    deadline = time.monotonic() + 420
    try:
        while not any(checkpoints.glob("checkpoint_*")) and driver.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint of round 1 appeared in time"
            time.sleep(0.5)
        assert driver.poll() is None, "the iterate run ended before it could be killed mid-round"
        time.sleep(1.0)  # let the first checkpoint finish writing
    finally:
        _kill_tree(driver)
    candidates = out / "rounds" / "round_1" / "candidates.jsonl"
    examples = out / "rounds" / "round_1" / "examples.jsonl"
    before = {path: _sha(path) for path in (candidates, examples)}
    assert not (out / "rounds" / "round_1" / "round.json").exists()

    summary = run_iterate(load_config(None, overrides))

    assert {path: _sha(path) for path in before} == before  # generation and judging were not redone
    round_1_train = json.loads((out / "rounds" / "round_1" / "train" / "summary.json").read_text())
    assert round_1_train["resumed_from_step"] >= 4 and round_1_train["steps"] == 16
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text())["rounds"] == rounds
    for record in rounds[1:]:
        assert record["examples"] > 32 and record["skipped"].get("identical_pair", 0) > 0
        assert record["judge_failures"] == {} and record["eval_judge_failures"] == {}
        assert 0.0 <= record["win_rate_vs_previous"] <= 1.0
        assert record["train_steps"] == 16
    # the reference is anti-aligned with the expert's rewards: training on its judged samples helps
    assert rounds[2]["expert_expected_reward"] > rounds[0]["expert_expected_reward"] + 0.2
    assert rounds[2]["expert_tv_to_target"] < rounds[0]["expert_tv_to_target"] - 0.05
    assert rounds[2]["expert_mass_on_s"] > 0.7  # the global KL term keeps most of the policy on S
    assert rounds[2]["win_rate_vs_reference"] > 0.5
    round_2_config = json.loads((out / "rounds" / "round_2" / "train" / "config.json").read_text())
    assert round_2_config["train"]["lr"] == pytest.approx(1e-3 * 0.8) == rounds[2]["train_lr"]
    round_2_train = json.loads((out / "rounds" / "round_2" / "train" / "summary.json").read_text())
    assert round_2_train["data"]["num_train"] == rounds[1]["examples"] + rounds[2]["examples"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]  # the rounds logger, one line per round


def test_sppo_round_regresses_log_ratios_onto_centered_win_probabilities(ray_runtime, tmp_path):
    out = tmp_path / "sppo"
    eta = 2.0
    cfg = load_config(
        None,
        [
            *SMALL,
            "iterate.rounds=1",
            "iterate.steps_per_round=20",
            "loss.name=sppo",
            f"loss.eta={eta}",
            "loss.kl_coef=0",
            "train.batch_size=4",
            "train.lr=2e-3",
            f"output.dir={out}",
        ],
    )
    summary = run_iterate(cfg)

    rows = [
        json.loads(line) for line in (out / "rounds" / "round_1" / "examples.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and all(len(row["responses"]) == 16 for row in rows)
    # every step sees all rows; at step 1 the policy is π_t itself, so lp_θ − lp_t = 0 and the loss is
    # the mean of (η (P̂ − ½))² over every sample
    first = json.loads((out / "rounds" / "round_1" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    expected = np.mean([(eta * (p - 0.5)) ** 2 for row in rows for p in row["win_probs"]])
    assert first["pref_loss"] == pytest.approx(expected, rel=1e-3)
    start, after = summary["rounds"]
    assert after["expert_expected_reward"] > start["expert_expected_reward"] + 0.1
    assert after["win_rate_vs_previous"] > 0.5


def test_best_of_n_round_with_a_python_judge_on_a_prompt_file(
    ray_runtime, tiny_model_dir, tmp_path, monkeypatch
):
    (tmp_path / "length_judge.py").write_text(
        "def score(prompt, responses):\n    return [-abs(len(r) - 12) for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # importable on the driver only; Ray gets it by value
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n" for w in "abcd"))
    out = tmp_path / "bon"
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "judge.name=python",
            "judge.callable=length_judge:score",
            f"iterate.prompts_file={prompts}",
            "iterate.rounds=1",
            "iterate.examples=best_of_n",
            "iterate.labels=argmax",
            "iterate.candidates_per_prompt=6",
            "iterate.steps_per_round=3",
            "iterate.max_tokens=16",
            "iterate.eval_samples=2",
            "loss.name=spo_best_of_n",
            "loss.kl_coef=0",
            "train.batch_size=2",
            "logging.wandb_mode=disabled",
            "logging.progress=false",
            f"output.dir={out}",
        ],
    )
    summary = run_iterate(cfg)

    rows = [
        json.loads(line) for line in (out / "rounds" / "round_1" / "examples.jsonl").read_text().splitlines()
    ]
    assert rows and len({len(row["responses"]) for row in rows}) == 1  # one group size per round
    for row in rows:
        scores = [-abs(len(r) - 12) for r in row["responses"]]
        assert len(row["ranking"]) == 1 and scores[row["ranking"][0]] == max(scores)
    start, after = summary["rounds"]
    samples = [
        json.loads(line)
        for line in (out / "rounds" / "round_1" / "eval_samples.jsonl").read_text().splitlines()
    ]
    lengths = [-abs(len(r) - 12) for s in samples for r in s["responses"]]
    assert after["expected_reward"] == pytest.approx(sum(lengths) / len(lengths))
    assert 0.0 <= after["win_rate_vs_reference"] <= 1.0 and after["train_steps"] == 3
    assert "expert_tv_to_target" not in after and after["judge_failures"] == {}
