"""A run the cluster cannot hold is refused before any work; a run that waits for resources says so."""

from __future__ import annotations

import json
import threading
import time

import pytest

from spo_ray.cli import main
from spo_ray.config import load_config
from spo_ray.training import resources


def write_pairs(path, n: int, bad: int = 0) -> str:
    rows = [{"prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]
    rows += [{"prompt": "q", "chosen": "only one response"}] * bad
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_args(tmp_path, model_dir, data_file, *settings):
    args = ["train", "--output-dir", str(tmp_path / "out")]
    base = [f"model.path={model_dir}", f"data.train_files=[{data_file}]", "logging.progress=false"]
    for setting in [*base, *settings]:
        args += ["--set", setting]
    return args


@pytest.mark.parametrize(
    "settings,key,shortfall",
    [
        (
            ["train.num_workers=1000", "loss.kl_coef=0"],
            "train.num_workers",
            "1001 CPUs, but the cluster has 4",
        ),
        # the tiny online recipe's shape on a cluster with no CPU left for Ray Data's read tasks
        (
            ["train.cpus_per_worker=2", "rollout.num_cpus_per_actor=2", "loss.kl_coef=0.02"],
            "train.num_workers",
            "5 CPUs, but the cluster has 4",
        ),
        (["train.use_gpu=true", "loss.kl_coef=0"], "train.use_gpu", "1 GPUs, but the cluster has 0"),
        (
            ["rollout.resources.rollout=1", "loss.kl_coef=0.02"],
            "rollout.resources",
            "no live node of the Ray cluster can hold a rollout engine",
        ),
    ],
    ids=[
        "too_many_workers",
        "no_cpu_left_for_data",
        "gpus_on_a_cpu_cluster",
        "no_node_with_rollout_resource",
    ],
)
def test_a_run_bigger_than_the_cluster_is_refused_before_its_data_is_prepared(
    ray_runtime, tmp_path, tiny_model_dir, capsys, settings, key, shortfall
):
    data = write_pairs(tmp_path / "prefs.jsonl", 16)
    code = main(train_args(tmp_path, tiny_model_dir, data, *settings))
    err = capsys.readouterr().err
    assert code == 2 and f"config key '{key}'" in err and shortfall in err, err
    assert "train.batch_size" not in err
    assert not (tmp_path / "out" / "data").exists()  # refused before data preparation


def test_the_same_run_on_an_autoscaling_cluster_warns_instead(ray_runtime, tmp_path, tiny_model_dir, capsys):
    cfg = load_config(
        None, ["train.num_workers=1000", "loss.kl_coef=0", "train.cluster_autoscales=true", "model.path=tiny"]
    )
    resources.check_cluster_resources(cfg)
    assert "config key 'train.num_workers'" in capsys.readouterr().out


def test_a_run_waiting_for_cpus_says_what_it_asked_and_what_is_free_then_trains(
    ray_runtime, tmp_path, tiny_model_dir, capsys, monkeypatch
):
    ray = ray_runtime
    monkeypatch.setattr(resources, "WAIT_NOTE_AFTER_S", 5.0)

    @ray.remote(num_cpus=3)
    class Holder:  # another job's actor holding 3 of the runtime's 4 CPUs
        def ready(self):
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    released = threading.Event()

    def release_after(seconds: float) -> None:
        time.sleep(seconds)
        ray.kill(holder)
        released.set()

    threading.Thread(target=release_after, args=(25.0,), daemon=True).start()
    # 4 bad rows of 16: data.on_bad_rows=skip must say it dropped them
    data = write_pairs(tmp_path / "prefs.jsonl", 12, bad=4)
    code = main(
        train_args(
            tmp_path,
            tiny_model_dir,
            data,
            "loss.kl_coef=0",
            "train.max_steps=1",
            "train.batch_size=2",
            "data.on_bad_rows=skip",
        )
    )
    out = capsys.readouterr().out
    assert code == 0 and released.is_set()
    assert "spo-ray: no training step after" in out and "trainers (train.num_workers=1" in out, out
    assert "'CPU': 4.0" in out  # the total, beside what is free
    quarantine = tmp_path / "out" / "quarantine.jsonl"
    assert (
        f"data: skipped 4 of 16 rows (missing_field 4); each one, with its file:line and reason, is in {quarantine}"
        in out
    )
