"""A real two-node Ray cluster on this machine: the trainer on the head, the vLLM rollout engine on a second
node (its own raylet and object store) chosen by `rollout.resources`; the job goes through `ray job submit`,
and the weights of every sync cross from the head's object store to the rollout node's.

One job run carries both kills: the engine process is killed (the rollout manager starts a replacement on
the same node and the run goes on), then the whole second node (the engine cannot be replaced anywhere: the
job fails, saying so). A node with the resource comes back and the re-submitted job resumes from its last
checkpoint and finishes every step. Last, a short probe job shows `rollout.colocate` moving an engine
from the driver's node to the node of the process standing for the trainers' rank 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
from ray_cluster import LocalRayCluster

pytestmark = pytest.mark.slow

STEPS = 30
CHECKPOINT_EVERY = 2
SETTINGS = [
    "task.num_pairs=200",
    "task.reference_fit_steps=10",
    "train.batch_size=4",
    f"train.max_steps={STEPS}",
    f"train.checkpoint_every={CHECKPOINT_EVERY}",
    "train.warmup_steps=1",
    "train.max_failures=0",  # a lost rollout node fails the run at once instead of after each retry
    "rollout.prompts_per_step=2",
    "rollout.max_tokens=8",
    "rollout.overlap=false",
    "rollout.resources.rollout=1",  # only the second node has it
    "logging.progress=false",
]


def _steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _engines(cluster: LocalRayCluster) -> list[dict]:
    return cluster.state("actors", "class_name=VllmEngine")


def _kill_engine_then_node(cluster, rollout_node, out: Path, record: dict) -> None:
    """At step 3 SIGKILL the engine process; once its replacement has served two more steps, the node."""
    try:
        cluster.wait_for(lambda: _steps_logged(out) >= 3, 600, "step 3")
        (engine,) = [a for a in _engines(cluster) if a["state"] == "ALIVE"]
        os.kill(engine["pid"], signal.SIGKILL)
        record["killed_engine"] = engine
        record["engine_killed_after_step"] = _steps_logged(out)
        replaced = cluster.wait_for(
            lambda: [a for a in _engines(cluster) if a["state"] == "ALIVE" and a["pid"] != engine["pid"]],
            600,
            "a replacement engine",
        )
        record["replacement"] = replaced[0]
        served = record["engine_killed_after_step"] + 2
        cluster.wait_for(lambda: _steps_logged(out) >= served, 600, f"step {served}")
        record["node_killed_after_step"] = _steps_logged(out)
        record["actors_before_node_kill"] = [
            (a["class_name"], a["node_id"], a["state"]) for a in cluster.state("actors")
        ]
        rollout_node.kill()
    except Exception as exc:  # reported by the test
        record["error"] = repr(exc)


def test_rollout_on_a_second_node_survives_an_engine_kill_fails_clearly_on_node_loss_and_resumes(tmp_path):
    cluster = LocalRayCluster(tmp_path)
    out = tmp_path / "run"
    job = ["python", "jobs/train_spo.py", "--config", "configs/tiny_cpu.yaml", "--output-dir", str(out)]
    job += [arg for setting in SETTINGS for arg in ("--set", setting)]
    try:
        head_id = cluster.start_head(num_cpus=3)
        rollout_node = cluster.add_node(num_cpus=1, resources={"rollout": 1}, name="rollout")
        first_rollout_id = rollout_node.node_id

        record: dict = {}
        killer = threading.Thread(
            target=_kill_engine_then_node, args=(cluster, rollout_node, out, record), daemon=True
        )
        killer.start()
        first = cluster.submit(job, submission_id="two-nodes-1")
        killer.join(timeout=60)
        first_log = first.stdout + first.stderr + cluster.job_logs("two-nodes-1")
        (tmp_path / "first_job.log").write_text(first_log)
        assert "error" not in record, record
        assert record.get("node_killed_after_step"), first_log[-4000:]
        # the engine kill: one replacement on the same node, and the run went on past it
        killed, replacement = record["killed_engine"], record["replacement"]
        assert killed["node_id"] == replacement["node_id"] == first_rollout_id
        assert "replacing rollout engine 0" in first_log
        # the node kill: no node has the rollout resource any more, and the job says so
        assert first.returncode != 0, first_log[-4000:]
        assert "cannot be replaced" in first_log and "rollout.resources={'rollout': 1.0}" in first_log, (
            first_log[-4000:]
        )
        stopped_at = _steps_logged(out)
        assert record["node_killed_after_step"] <= stopped_at < STEPS

        # a node with the resource comes back; the same command resumes from the last checkpoint
        second_rollout = cluster.add_node(num_cpus=1, resources={"rollout": 1}, name="rollout2")
        second = cluster.submit(job, submission_id="two-nodes-2")
        assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == STEPS
        assert summary["resumed_from_step"] == stopped_at - stopped_at % CHECKPOINT_EVERY > 0

        # where each actor ran, from Ray's own record
        engines = _engines(cluster)
        trainers = cluster.state("actors", "class_name=RayTrainWorker")
        assert trainers and {a["node_id"] for a in trainers} == {head_id}
        ran = [a for a in engines if a["node_id"]]  # a replacement tried after the node loss never got one
        engine_nodes = {a["node_id"] for a in ran}
        assert engine_nodes == {first_rollout_id, second_rollout.node_id}
        assert len(ran) == 3  # the first, its replacement after the kill, the one after re-submitting

        # the weights crossed object stores at every sync: Ray's object directory lists the payload on the
        # engine's node as well as the trainer's, and its size is the model's
        rows = _metric_rows(out)
        synced = [r for r in rows if r["sync_bytes"] > 0]
        assert len(synced) >= STEPS - stopped_at
        weights = (out / "final" / "model.safetensors").stat().st_size
        for row in synced:
            assert row["sync_bytes_other_nodes"] == row["sync_bytes"]
            assert abs(row["sync_bytes"] - weights) < 0.01 * weights

        # rollout.colocate: the pool starts its engine beside the driver (on the head, under `ray job submit`);
        # when a process on the rollout node (standing for the trainers' rank 0) asks, the engine moves there
        probe = cluster.submit(
            [
                sys.executable,
                "tests/colocate_probe.py",
                str(out / "expert_reference"),
                second_rollout.node_id,
            ],
            submission_id="two-nodes-colocate",
        )
        assert probe.returncode == 0, (probe.stdout + probe.stderr)[-4000:]
        line = next(x for x in probe.stdout.splitlines() if x.startswith("COLOCATE "))
        colocate = json.loads(line.removeprefix("COLOCATE "))
        assert colocate["driver_node"] == colocate["started_on"] == head_id
        assert colocate["caller_node"] == colocate["now_on"] == second_rollout.node_id
        assert colocate["moved"] == 1 and colocate["served_after_move"]
        print(
            json.dumps(
                {
                    "head": head_id,
                    "rollout_nodes": sorted(engine_nodes),
                    "trainers": [(a["node_id"], a["pid"]) for a in trainers],
                    "engines": [(a["node_id"], a["pid"], a["state"]) for a in engines],
                    "bytes_to_other_nodes_per_sync": sorted({r["sync_bytes_other_nodes"] for r in synced}),
                    "kills": record,
                    "stopped_at": stopped_at,
                    "resumed_from": summary["resumed_from_step"],
                    "colocate": colocate,
                },
                default=str,
            )
        )
    finally:
        cluster.stop()
