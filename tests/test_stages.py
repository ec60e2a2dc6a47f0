"""`spo-ray stages` (Sequential PO) on real Ray Train: stage 2 trains from stage 1's final model on its own
dimension's rows, with seqpo's base log-probs from π_0, and a re-run resumes at the stage where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_ray.config import load_config
from spo_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, model_dir, data, dimensions, *extra):
    return load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [
            "task.name=none",
            f"model.path={model_dir}",
            f"data.train_files=[{data}]",
            "loss.name=seqpo",
            "loss.kl_coef=0",
            "loss.beta=0.5",
            f"stages.dimensions=[{','.join(dimensions)}]",
            "stages.steps=[2,2]" if len(dimensions) == 2 else "stages.steps=[2]",
            "train.batch_size=4",
            "train.warmup_steps=0",
            "train.checkpoint_every=0",
            "logging.progress=false",
            "logging.wandb_mode=disabled",
            f"output.dir={tmp_path / 'run'}",
            *extra,
        ],
    )


def test_stage_rules_name_their_keys(tmp_path, tiny_model_dir):
    from spo_ray.iterative.stages import check_stages

    data = tmp_path / "d.jsonl"
    data.write_text("")
    cases = [
        ([], "stages.dimensions"),
        (["a", "a"], "stages.dimensions"),
    ]
    for dims, key in cases:
        cfg = load_config(
            REPO / "configs" / "tiny_cpu.yaml",
            ["task.name=none", f"data.train_files=[{data}]", f"stages.dimensions=[{','.join(dims)}]"],
        )
        with pytest.raises(ConfigError) as info:
            check_stages(cfg)
        assert info.value.key == key
    cfg = load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        ["task.name=none", f"data.train_files=[{data}]", "stages.dimensions=[a,b]", "stages.steps=[3]"],
    )
    with pytest.raises(ConfigError, match="one per stage"):
        check_stages(cfg)


@pytest.mark.slow
def test_stages_run_in_order_and_a_rerun_resumes_at_stage_two(tmp_path, tiny_model_dir, ray_runtime):
    from spo_ray.iterative.stages import run_stages

    data = tmp_path / "two.jsonl"
    rows = [
        {"prompt": f"Name a color {i}.", "chosen": "Red.", "rejected": "Blue.", "dimension": "a"}
        for i in range(8)
    ] + [
        {"prompt": f"Name a fruit {i}.", "chosen": "Pear.", "rejected": "Plum.", "dimension": "b"}
        for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    first = run_stages(_config(tmp_path, tiny_model_dir, data, ["a"]))  # stops after stage 1
    stage1 = first["stages"][0]
    assert (stage1["stage"], stage1["dimension"], stage1["steps"], stage1["skipped"]) == (1, "a", 2, False)
    final1 = Path(stage1["model"])
    weights = sorted(final1.glob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in weights]

    second = run_stages(_config(tmp_path, tiny_model_dir, data, ["a", "b"]))
    s1, s2 = second["stages"]
    assert s1["skipped"] and s1["model"] == str(final1)
    assert [p.stat().st_mtime_ns for p in weights] == stamps  # stage 1 was not trained again
    assert not s2["skipped"] and s2["start_model"] == str(final1) and s2["steps"] == 2
    train2 = Path(s2["model"]).parent
    stage_cfg = json.loads((train2 / "config.json").read_text())
    assert stage_cfg["model"]["path"] == stage_cfg["model"]["reference_path"] == str(final1)
    assert stage_cfg["loss"]["seqpo_base_path"] == second["base_model"] == str(tiny_model_dir)
    assert stage_cfg["data"]["dimension"] == "b"
    summary2 = json.loads((train2 / "summary.json").read_text())
    assert summary2["data"]["num_train"] == 12  # only dimension b's rows
    assert (train2 / "base_logps" / "base_logps.npy").exists()  # π_0's log-probs of stage 2's rows

    third = run_stages(_config(tmp_path, tiny_model_dir, data, ["a", "b"]))  # everything done: both skipped
    assert [s["skipped"] for s in third["stages"]] == [True, True]
    assert third["final_model"] == s2["model"]
