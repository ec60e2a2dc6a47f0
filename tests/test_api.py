"""The public Python API: configs from YAML/dicts/overrides, datasets as objects, callbacks, and the README's
example run as a user's own Ray program."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import spo_ray
from spo_ray.config import Config
from spo_ray.data.in_memory import dataset_files
from spo_ray.data.sources import iter_chunk_rows, plan_chunks, resolve_sources
from spo_ray.errors import ConfigError, UserError
from spo_ray.training.callbacks import Callback, RunWatcher
from spo_ray.training.checkpointing import CheckpointStore

REPO = Path(__file__).resolve().parents[1]
ROWS = [  # conversational rows: nested lists of messages must survive every container
    {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }
    for question, good, bad in [
        ("What is 12 times 3?", "12 times 3 is 36.", "It is a number."),
        ("Name a primary color.", "Red.", "Colors are nice."),
    ]
]


def test_config_from_yaml_dict_and_overrides_validates_and_names_the_key():
    cfg = Config.from_yaml(REPO / "configs" / "tiny_cpu.yaml", {"loss.alpha": 0.5, "train.max_steps": 7})
    assert (cfg.loss.alpha, cfg.train.max_steps, cfg.task.name) == (0.5, 7, "synthetic_expert")
    listed = Config.from_yaml(REPO / "configs" / "tiny_cpu.yaml", ["loss.alpha=0.5", "train.max_steps=7"])
    assert listed == cfg
    changed = cfg.with_overrides({"loss.name": "dpo"})
    assert changed.loss.name == "dpo" and cfg.loss.name == "spo"  # a copy; the original is unchanged
    assert Config.from_dict({"loss": {"alpha": 2}}, ["train.lr=1e-3"]).train.lr == 1e-3
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"loss\.alpah.*did you mean 'alpha'"):
        Config.from_dict({"loss": {"alpah": 2}})
    with pytest.raises(ConfigError, match=r"loss\.alpha.*greater than"):
        cfg.with_overrides({"loss.alpha": -1})
    with pytest.raises(TypeError, match="config must be"):
        spo_ray.train(42)
    with pytest.raises(ConfigError, match="a list of section.key=value strings"):
        spo_ray.train(cfg, overrides="loss.alpha=0.5")  # a bare string, not a list of them


def test_a_cluster_recipe_builds_on_a_laptop_and_train_refuses_its_missing_model_by_key(tmp_path):
    cfg = Config.from_yaml(REPO / "configs" / "cluster_example.yaml")  # model.path exists only on the cluster
    assert not os.path.exists(cfg.model.path)
    with pytest.raises(ConfigError, match=r"model\.path.*does not exist"):
        spo_ray.train(cfg, output_dir=tmp_path / "run")


def _rows_read(files: list[str]) -> list:
    """The rows as the pipeline's own reader decodes them (the first stage of every run)."""
    chunks = plan_chunks(resolve_sources(files, "data.train_files"), 1 << 20, "train")
    return [row.value for chunk in chunks for row in iter_chunk_rows(chunk)]


def test_lists_dataframes_hf_and_ray_datasets_reach_the_pipeline_as_the_same_rows(ray_runtime, tmp_path):
    import datasets
    import pandas as pd
    import ray.data

    given = {
        "list": ROWS,
        "dataframe": pd.DataFrame(ROWS),
        "hf": datasets.Dataset.from_list(ROWS),
        "ray": ray.data.from_items(ROWS),
    }
    for name, dataset in given.items():
        files = dataset_files(dataset, tmp_path / name, "train_dataset")
        assert _rows_read(files) == ROWS, name
        assert not list((tmp_path / name).glob("*.partial"))  # written under a temporary name, then moved
    assert dataset_files(str(REPO / "examples" / "preferences.jsonl"), tmp_path, "x") == [
        str(REPO / "examples" / "preferences.jsonl")
    ]


def test_datasets_that_cannot_be_used_are_refused_saying_what_to_give(tmp_path):
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(UserError, match=r"DatasetDict with splits \['train'\].*ds\['train'\]"):
        dataset_files(splits, tmp_path, "train_dataset")
    with pytest.raises(UserError, match=r"train_dataset\[1\] is a str"):
        dataset_files([ROWS[0], "not a row"], tmp_path, "train_dataset")
    with pytest.raises(UserError, match="a list of dicts, a pandas DataFrame"):
        dataset_files(3.5, tmp_path, "train_dataset")
    expert = Config.from_yaml(REPO / "configs" / "tiny_cpu.yaml")
    with pytest.raises(ConfigError, match=r"task\.name.*writes its own data"):
        spo_ray.train(expert, train_dataset=ROWS, output_dir=tmp_path / "run")


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_step(self, step, metrics):
        self.calls.append(("step", step, metrics["loss"]))

    def on_eval(self, step, metrics):
        self.calls.append(("eval", step, metrics["eval/loss"]))


def test_callbacks_get_each_step_and_evaluation_once_in_order_after_the_resumed_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    recorder = Recorder()
    watcher = RunWatcher(tmp_path, CheckpointStore(tmp_path / "checkpoints"), [recorder], after_step=2)
    lines = [{"step": s, "loss": float(s)} for s in range(1, 5)]  # steps 1-2 are the resumed run's
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    watcher.poll()
    assert recorder.calls == [("step", 3, 3.0), ("step", 4, 4.0)]
    # a restarted worker group rewrites step 4; then step 5 and an evaluation at 5 arrive
    more = [{"step": 4, "loss": 40.0}, {"step": 5, "loss": 5.0}, {"step": 5, "eval/loss": 0.5}]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines[:3] + more))
    watcher.poll()
    watcher.poll()
    assert recorder.calls[2:] == [("step", 5, 5.0), ("eval", 5, 0.5)]
    # the logger's usual form: a step's evaluation merged into its own line; the step comes first
    metrics.write_text(metrics.read_text() + json.dumps({"step": 6, "loss": 6.0, "eval/loss": 0.25}) + "\n")
    watcher.poll()
    assert recorder.calls[4:] == [("step", 6, 6.0), ("eval", 6, 0.25)]


def test_a_raising_callback_stops_further_calls_and_is_raised_when_the_run_ends(tmp_path, capsys):
    class Broken(Callback):
        def on_step(self, step, metrics):
            raise ValueError(f"bad step {step}")

    recorder = Recorder()
    watcher = RunWatcher(tmp_path, CheckpointStore(tmp_path / "checkpoints"), [Broken(), recorder], 0)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n')
    watcher.poll()
    assert recorder.calls == []
    assert "Broken.on_step raised at step 1" in capsys.readouterr().out
    with pytest.raises(spo_ray.CallbackError, match="bad step 1"):
        watcher.raise_if_failed()


def _readme_api_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_api_example_trains_in_the_users_own_ray_program(tmp_path):
    for folder in ("configs", "examples"):
        (tmp_path / folder).symlink_to(REPO / folder)
    report = """
import json as _json
from spo_ray.training.checkpointing import read_state as _read_state
print("REPORT " + _json.dumps({
    "steps": progress.steps, "checkpoints": progress.checkpoints,
    "losses": [(m["step"], m["loss"]) for m in result.metrics],
    "checkpoint_step": _read_state(result.checkpoint).step, "final_model": result.final_model,
    "num_train": result.summary["data"]["num_train"], "ray_up": ray.is_initialized(),
    "nodes": len(ray.nodes()),
}))
"""
    script = tmp_path / "example.py"
    script.write_text(_readme_api_example() + report)
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_ADDRESS": "local"}  # a fresh runtime of its own
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    assert [s for s, _ in report["steps"]] == [1, 2, 3, 4, 5, 6]
    assert [list(x) for x in report["steps"]] == [
        list(x) for x in report["losses"]
    ]  # what metrics.jsonl says
    assert report["checkpoints"] == [3, 6] and report["checkpoint_step"] == 6
    assert report["num_train"] == 32 and report["ray_up"] and report["nodes"] == 1
    assert "steps [1, 2, 3, 4, 5, 6] checkpoints [3, 6]" in done.stdout
    final = (tmp_path / report["final_model"]).resolve()  # relative paths are from the script's folder
    assert final == (tmp_path / "outputs" / "api_example" / "final").resolve()
    assert (final / "config.json").is_file()
    assert (tmp_path / "outputs" / "api_example" / "inputs" / "train_dataset.jsonl").is_file()


@pytest.mark.slow
def test_generate_returns_one_row_per_sample_and_leaves_the_callers_runtime_running(
    ray_runtime, tiny_model_dir, tmp_path
):
    rows = spo_ray.generate(
        tiny_model_dir,
        ["hello there", [1, 280, 201]],
        n=2,
        max_tokens=4,
        backend="hf",
        out=tmp_path / "s.jsonl",
    )
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(1 <= len(r["token_ids"]) <= 4 for r in rows) and rows[2]["prompt_token_ids"] == [1, 280, 201]
    written = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert written == rows and ray_runtime.is_initialized()
