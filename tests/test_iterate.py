"""`spo-ray iterate` end to end on the synthetic expert task: real Ray Train, real vLLM, real judge."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from spo_ray.config import load_config
from spo_ray.iterative import run_iterate
from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask
from spo_ray.training.callbacks import Callback

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
    checkpoints = out / "rounds" / "round_1" / "train" / "checkpoints"
    deadline = time.monotonic() + 420
    try:
        while not any(checkpoints.glob("*/checkpoint_*")) and driver.poll() is None:
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
    task = SyntheticExpertTask.load(out / "task" / "task.json")
    for previous, record in zip(rounds, rounds[1:]):
        assert record["examples"] > 32 and record["skipped"].get("identical_pair", 0) > 0
        assert record["judge_failures"] == {} and record["eval_judge_failures"] == {}
        # the expert's mean P(ours ≻ theirs) over the two rounds' stored eval samples
        expected = _expert_win_rate(task, record["eval_samples"], previous["eval_samples"])
        assert record["win_rate_vs_previous"] == pytest.approx(expected, rel=1e-9)
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


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _expert_win_rate(task, ours_path, theirs_path) -> float:
    """Mean P(a ≻ b) of the expert over every (a, b) of the same eval prompt, recomputed from the files."""
    probabilities = [
        task.preference_probability(ours["prompt"][-1]["content"], a, b)
        for ours, theirs in zip(_read_jsonl(ours_path), _read_jsonl(theirs_path))
        for a in ours["responses"]
        for b in theirs["responses"]
    ]
    return sum(probabilities) / len(probabilities)


class _RoundRecorder(Callback):
    """Records (round, step, what) for every step and checkpoint a callback is called for."""

    def __init__(self):
        self.steps, self.checkpoints = [], []

    def on_step(self, step, metrics):
        self.steps.append((self.round, step, metrics["pref_loss"]))

    def on_checkpoint(self, step, path):
        self.checkpoints.append((self.round, step, path))


def test_lora_rounds_keep_the_kl_anchor_at_the_starting_policy(ray_runtime, tmp_path):
    """Round 2 starts from round 1's merged model with a fresh adapter; its KL reference stays π_0.
    The user's callbacks are called for every round's steps and checkpoints, knowing the round."""
    out = tmp_path / "lora"
    cfg = load_config(
        None,
        [
            *SMALL,
            "iterate.rounds=2",
            "iterate.steps_per_round=3",
            "iterate.candidates_per_prompt=8",
            "model.lora.r=4",
            "rollout.overlap=false",  # lag 0: rollout log-probs must equal the trainer's
            "rollout.cpu_weights=packed",  # vLLM's oneDNN-packed weights: every load is a full reload
            "loss.name=spo",
            "loss.kl_coef=0.1",
            # the entropy dial on the rounds' own candidates: α goes on from round to round
            "loss.target_entropy=1.5",
            "loss.entropy_on=compared",
            "loss.alpha_lr=0.1",
            "train.batch_size=8",
            "train.lr=5e-3",
            "train.warmup_steps=0",
            f"output.dir={out}",
        ],
    )
    recorder = _RoundRecorder()
    summary = run_iterate(cfg, callbacks=[recorder])
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert recorder.steps == [
        (n, row["step"], row["pref_loss"])
        for n in (1, 2)
        for row in _read_jsonl(out / "rounds" / f"round_{n}" / "train" / "metrics.jsonl")
    ]
    assert [(n, step) for n, step, _ in recorder.steps] == [(n, s) for n in (1, 2) for s in (1, 2, 3)]
    assert [(n, step) for n, step, _ in recorder.checkpoints] == [(1, 3), (2, 3)]
    assert all(f"round_{n}" in path for n, _, path in recorder.checkpoints)
    first_steps = {
        n: _read_jsonl(out / "rounds" / f"round_{n}" / "train" / "metrics.jsonl")[0] for n in (1, 2)
    }
    # round 2's first α is one dual-ascent step on from round 1's last, not loss.alpha again
    from spo_ray.training.entropy_dial import dual_ascent_alpha

    last_of_1 = _read_jsonl(out / "rounds" / "round_1" / "train" / "metrics.jsonl")[-1]
    assert first_steps[1]["alpha"] == 1.0 and 0 < last_of_1["entropy/measured"] <= math.log(8)
    carried = dual_ascent_alpha(last_of_1["alpha"], 1.5, last_of_1["entropy/measured"], 0.1)
    assert first_steps[2]["alpha"] == pytest.approx(carried, rel=1e-9) and carried != 1.0
    # Round 1 starts at π_0 (a zero adapter): no KL. Round 2 starts at π_1 and is still measured against π_0.
    assert first_steps[1]["kl_token"] < 1e-6
    assert first_steps[2]["kl_token"] > 1e-4
    # rollout.lora_sync=auto on vLLM: the first sync of a round sends the adapter with its frozen base, the
    # others the adapter alone; the engines' log-probs equal the trainer's after either
    for n in (1, 2):
        rows = _read_jsonl(out / "rounds" / f"round_{n}" / "train" / "metrics.jsonl")
        assert all(row["policy_lag"] == 0 and row["rollout_logp_gap"] < 1e-3 for row in rows)
        # rollout.async_sync: each row reports the last completed sync, so a round's second step shows the round's
        # first sync (base + adapter) and its third the adapter alone (the first shows the one before the round)
        assert 0 < 8 * rows[2]["sync_bytes"] < rows[1]["sync_bytes"]
    round_2 = json.loads((out / "rounds" / "round_2" / "train" / "config.json").read_text())
    assert round_2["model"]["reference_path"] == str(out / "expert_reference")
    assert round_2["model"]["path"] == summary["rounds"][1]["model"]
    # each round also writes its adapter alone (a PEFT folder) beside the merged final/: the same model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = out / "rounds" / "round_2" / "train"
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(round_2["model"]["path"])
        from_adapter = PeftModel.from_pretrained(base, trained / "final_adapter")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(trained / "final")(ids).logits
    assert torch.allclose(from_adapter, merged, atol=1e-5)


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
    theirs = _read_jsonl(out / "rounds" / "round_0" / "eval_samples.jsonl")
    wins = [
        1 / (1 + math.exp(-(-abs(len(a) - 12) + abs(len(b) - 12))))  # the judge's σ(s_a − s_b)
        for o, t in zip(samples, theirs)
        for a in o["responses"]
        for b in t["responses"]
    ]
    assert after["win_rate_vs_reference"] == pytest.approx(sum(wins) / len(wins), rel=1e-9)
    assert after["train_steps"] == 3
    assert "expert_tv_to_target" not in after and after["judge_failures"] == {}
