"""The config tree: YAML + dotted overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from spo_ray.config import Config, config_from_dict, config_to_dict, dump_yaml, load_config
from spo_ray.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_load_and_every_field_has_help():
    cfg = load_config(None)

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            assert f.metadata.get("help"), f"{prefix}{f.name} has no help"
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                walk(getattr(obj, f.name), f"{prefix}{f.name}.")

    walk(cfg)
    assert cfg.loss.name == "spo" and cfg.loss.alpha == 1.0


def test_yaml_and_dotted_overrides_resolve_in_order(tmp_path):
    path = write(tmp_path, "loss:\n  alpha: 2.0\n  beta: 0.5\ntrain:\n  max_steps: 7\n")
    cfg = load_config(path, ["loss.alpha=0.5", "train.lr=3e-4", "data.packing=true"])
    assert cfg.loss.alpha == 0.5 and cfg.loss.beta == 0.5
    assert cfg.train.max_steps == 7 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.packing is True


def test_integer_is_accepted_where_a_float_is_expected(tmp_path):
    cfg = load_config(write(tmp_path, "loss:\n  alpha: 2\n"))
    assert isinstance(cfg.loss.alpha, float)


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["loss.alpah=1"], "loss.alpah", "did you mean 'alpha'"),
        (["lsos.alpha=1"], "lsos", "did you mean 'loss'"),
        (["loss.alpha=0"], "loss.alpha", "greater than 0"),
        (["loss.alpha=-1"], "loss.alpha", "out of range"),
        (["loss.kl_coef=-0.1"], "loss.kl_coef", "at least 0"),
        (["loss.beta=0"], "loss.beta", "greater than 0"),
        (["loss.ref_beta=0.1"], "loss.ref_beta", "now loss.beta"),
        (["loss.epsilon=0.5"], "loss.epsilon", "less than 0.5"),
        (["loss.epsilon=-0.01"], "loss.epsilon", "at least 0"),
        (["train.max_steps=ten"], "train.max_steps", "expected an integer"),
        (["train.max_steps=2.5"], "train.max_steps", "expected an integer"),
        (["data.packing=maybe"], "data.packing", "expected true or false"),
        (["data.on_bad_rows=ignore"], "data.on_bad_rows", "not one of"),
        (["loss.name=dpoo"], "loss.name", "dpo"),
        (["loss.pair_weight_gamma=-0.5"], "loss.pair_weight_gamma", "at least 0"),
        (
            ["loss.name=spo_ranked", "loss.pair_weight_gamma=1"],
            "loss.pair_weight_gamma",
            "loss.name=spo only",
        ),
        (["loss.name=dpo", "loss.pair_weight_gamma=1"], "loss.pair_weight_gamma", "loss.name=spo only"),
        (["loss.kl_on=prompts"], "loss.kl_on", "not one of"),
        (["loss.kl_on=dataset", "loss.kl_coef=0"], "loss.kl_on", "loss.kl_coef > 0"),
        (["loss.target_entropy=-1"], "loss.target_entropy", "at least 0"),
        (["loss.alpha_lr=0"], "loss.alpha_lr", "greater than 0"),
        (["loss.entropy_min_prob=1"], "loss.entropy_min_prob", "less than 1"),
        (["loss.entropy_on=answers"], "loss.entropy_on", "not one of"),
        (["loss.name=dpo", "loss.target_entropy=1"], "loss.target_entropy", "an SPO loss"),
        (["loss.target_entropy=1", "loss.kl_coef=0"], "loss.target_entropy", "kl_on=online"),
        (["loss.target_entropy=1", "loss.kl_on=dataset"], "loss.target_entropy", "online samples"),
        (["data.train_files=[/no/such/file.jsonl]"], "data.train_files[0]", "does not exist"),
        (["model.path=/no/such/model"], "model.path", "does not exist"),
        (["data.max_prompt_length=600"], "data.max_prompt_length", "no room"),
        (["train.strategy=zero3"], "train.strategy", "not one of"),
        (["rollout.lora_sync=adapter"], "rollout.lora_sync", "model.lora.r > 0"),
        (["rollout.cpu_weights=fast"], "rollout.cpu_weights", "not one of"),
        (
            ["rollout.lora_sync=adapter", "model.lora.r=8", "rollout.backend=hf"],
            "rollout.lora_sync",
            "backend=vllm",
        ),
    ],
)
def test_bad_values_raise_an_error_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert words in str(info.value)


def test_bad_yaml_file_is_reported_with_its_path(tmp_path):
    path = write(tmp_path, "loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_round_trips_through_a_plain_dict():
    cfg = load_config(None, ["loss.alpha=0.25", "data.train_files=[]"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg and isinstance(again, Config)


def test_dump_yaml_reloads_to_the_same_config(tmp_path):
    cfg = load_config(None, ["loss.alpha=0.25", "model.lora.target_modules=[q_proj]"])
    path = write(tmp_path, dump_yaml(cfg))
    assert load_config(path) == cfg


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "spo_ray.cli", *args], capture_output=True, text=True)


def test_config_show_inspects_a_cluster_recipe_whose_files_are_not_here_and_train_still_refuses_it(tmp_path):
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "cluster_example.yaml")
    shown = run_cli("config", "show", "--config", recipe)
    assert shown.returncode == 0, shown.stderr
    assert "path: /shared/models/my-sft-model" in shown.stdout
    assert (
        "warning: config key 'model.path': file or folder '/shared/models/my-sft-model' does not exist"
        in (shown.stderr)
    )
    refused = run_cli("train", "--config", recipe, "--output-dir", str(tmp_path / "out"))
    assert refused.returncode == 2 and "config key 'model.path'" in refused.stderr


def test_verbose_flag_sets_the_logging_level_of_a_run_config():
    from spo_ray.cli import build_parser
    from spo_ray.commands.config import load_run_config

    quiet = load_run_config(build_parser().parse_args(["train"]))
    verbose = load_run_config(build_parser().parse_args(["--verbose", "train"]))
    assert (quiet.logging.level, verbose.logging.level) == ("warning", "info")


def test_cli_config_show_prints_resolved_values_and_exits_2_on_bad_key(tmp_path):
    path = write(tmp_path, "loss:\n  alpha: 2.0\n")
    shown = run_cli("config", "show", "--config", str(path), "--set", "train.max_steps=3")
    assert shown.returncode == 0, shown.stderr
    assert "alpha: 2.0" in shown.stdout and "max_steps: 3" in shown.stdout
    bad = run_cli("config", "show", "--set", "loss.alpah=2")
    assert bad.returncode == 2
    assert "loss.alpah" in bad.stderr and "did you mean 'alpha'" in bad.stderr


def test_cli_help_lists_every_subcommand_with_a_line_of_help():
    from spo_ray.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    helps = {action.dest: action.help for action in sub._choices_actions}
    assert {"config", "make-tiny-model"} <= set(helps)
    assert all(helps.values())
    shown = run_cli("--help")
    assert shown.returncode == 0 and "make-tiny-model" in shown.stdout


@pytest.mark.parametrize(
    "recipe", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads_and_validates(recipe):
    cfg = load_config(recipe, check_files=False)
    assert isinstance(cfg, Config) and cfg.output.dir


# A tiny-model CPU step, measured on the 2-core machine: 0.3-0.6 s (the first ~19 s with start-up); 1 s under load.
TINY_STEP_S = 1.0


@pytest.mark.parametrize("recipe", ["tiny_cpu.yaml", "expert_synthetic.yaml"])
def test_the_tiny_recipes_checkpoint_often_enough_that_a_stopped_run_loses_under_a_minute(recipe):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / recipe)
    assert 0 < cfg.train.checkpoint_every * TINY_STEP_S <= 60


def test_in_dataset_kl_needs_no_rollout_and_the_global_kl_does():
    from spo_ray.config import draws_online_samples
    from spo_ray.training.runner import local_cpus_needed

    online = load_config(None, ["loss.kl_coef=0.1"])
    dataset = load_config(None, ["loss.kl_coef=0.1", "loss.kl_on=dataset"])
    offline = load_config(None, ["loss.kl_coef=0"])
    assert draws_online_samples(online) and not draws_online_samples(dataset)
    assert not draws_online_samples(offline)
    assert local_cpus_needed(dataset) == local_cpus_needed(offline) < local_cpus_needed(online)
    assert load_config(None, ["loss.target_entropy=1.1", "loss.name=spo_ranked"]).loss.target_entropy == 1.1
    # measured on the batch's compared responses, the dial needs no online samples
    compared = load_config(None, ["loss.target_entropy=0.8", "loss.entropy_on=compared", "loss.kl_coef=0"])
    assert compared.loss.entropy_on == "compared" and not draws_online_samples(compared)
