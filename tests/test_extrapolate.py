"""ExPO extrapolation on real tiny models and real files: the formula, refusals, and the judged λ grid."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from spo_ray.cli import main
from spo_ray.errors import UserError
from spo_ray.models.extrapolate import ModelMismatchError, extrapolate, read_state_dict
from spo_ray.models.tiny import build_tiny_model
from spo_ray.tasks.synthetic_expert.evaluate import expert_metrics, response_distribution
from spo_ray.tasks.synthetic_expert.reference import fit_reference
from spo_ray.tasks.synthetic_expert.task import OUTSIDE_SCORE, SyntheticExpertTask


def save_perturbed(source_dir, out_dir, seed: int, scale: float = 0.02, dtype=torch.float32, tied=False):
    """Save the model of `source_dir` plus Gaussian noise on every weight (optionally re-tied or cast)."""
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    if tied:
        config = model.config
        config.tie_word_embeddings = True
        tied_model = LlamaForCausalLM(config)
        tied_model.load_state_dict(model.state_dict(), strict=False)
        model = tied_model
        model.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def aligned_dir(tiny_model_dir, tmp_path_factory):
    return save_perturbed(tiny_model_dir, tmp_path_factory.mktemp("models") / "aligned", seed=1)


def weights_of(folder) -> dict[str, torch.Tensor]:
    return read_state_dict(folder)


def test_extrapolated_tensors_equal_aligned_plus_weight_times_aligned_minus_sft(
    tiny_model_dir, aligned_dir, tmp_path
):
    out = extrapolate(tiny_model_dir, aligned_dir, 0.3, tmp_path / "expo")
    sft, aligned, result = weights_of(tiny_model_dir), weights_of(aligned_dir), weights_of(out)
    assert set(result) == set(aligned) and len(result) > 10
    for name, tensor in result.items():
        assert tensor.dtype == aligned[name].dtype
        expected = aligned[name] + 0.3 * (aligned[name] - sft[name])
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(tensor, aligned[name]), name  # every tensor really moved
    assert json.loads((out / "expo.json").read_text())["weight"] == 0.3


def test_weight_zero_reproduces_the_aligned_tensors_exactly(tiny_model_dir, aligned_dir, tmp_path):
    out = extrapolate(tiny_model_dir, aligned_dir, 0, tmp_path / "expo")
    aligned, result = weights_of(aligned_dir), weights_of(out)
    assert set(result) == set(aligned)
    assert all(torch.equal(result[name], aligned[name]) for name in aligned)


def test_weight_minus_one_gives_the_sft_model_and_below_minus_one_warns(
    tiny_model_dir, aligned_dir, tmp_path
):
    result, sft = (
        weights_of(extrapolate(tiny_model_dir, aligned_dir, -1, tmp_path / "sft")),
        weights_of(tiny_model_dir),
    )
    for name, tensor in result.items():
        torch.testing.assert_close(tensor, sft[name], rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="past the SFT model"):
        extrapolate(tiny_model_dir, aligned_dir, -1.5, tmp_path / "beyond")


def test_output_keeps_the_aligned_dtype_computing_in_float32(tiny_model_dir, tmp_path):
    aligned_bf16 = save_perturbed(tiny_model_dir, tmp_path / "bf16", seed=2, dtype=torch.bfloat16)
    result = weights_of(extrapolate(tiny_model_dir, aligned_bf16, 0.5, tmp_path / "expo"))
    sft, aligned = weights_of(tiny_model_dir), weights_of(aligned_bf16)
    for name, tensor in result.items():
        assert tensor.dtype == torch.bfloat16
        a = aligned[name].float()
        assert torch.equal(tensor, (a + 0.5 * (a - sft[name].float())).to(torch.bfloat16)), name


def test_output_folder_loads_with_transformers_and_its_tokenizer(tiny_model_dir, aligned_dir, tmp_path):
    out = extrapolate(tiny_model_dir, aligned_dir, 0.3, tmp_path / "expo")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    reference_tokenizer = AutoTokenizer.from_pretrained(aligned_dir, local_files_only=True)
    text = reference_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a color."}], tokenize=False
    )
    assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
    assert (out / "generation_config.json").is_file()
    state = weights_of(out)
    for name, param in model.state_dict().items():
        assert torch.equal(param, state[name]), name
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_sharded_aligned_model_gives_a_sharded_output_with_the_same_index(
    tiny_model_dir, aligned_dir, tmp_path
):
    model = AutoModelForCausalLM.from_pretrained(aligned_dir)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(aligned_dir).save_pretrained(tmp_path / "sharded")
    out = extrapolate(tiny_model_dir, tmp_path / "sharded", 0.3, tmp_path / "expo")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    expected = weights_of(extrapolate(tiny_model_dir, aligned_dir, 0.3, tmp_path / "single"))
    result = weights_of(out)
    assert set(result) == set(expected) and all(torch.equal(result[k], expected[k]) for k in expected)
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)  # transformers reads the shards back


def test_tied_embeddings_stay_tied_and_extrapolated(tiny_model_dir, tmp_path):
    sft_tied = save_perturbed(tiny_model_dir, tmp_path / "sft_tied", seed=3, tied=True)
    aligned_tied = save_perturbed(sft_tied, tmp_path / "aligned_tied", seed=4)
    assert "lm_head.weight" not in weights_of(aligned_tied)  # save_pretrained stores one tied tensor
    out = extrapolate(sft_tied, aligned_tied, 0.3, tmp_path / "expo")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    embed = "model.embed_tokens.weight"
    a, s = weights_of(aligned_tied)[embed], weights_of(sft_tied)[embed]
    torch.testing.assert_close(model.model.embed_tokens.weight.data, a + 0.3 * (a - s))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_different_hidden_size_is_refused_naming_the_tensor_and_both_folders(
    tiny_model_dir, tmp_path_factory, tmp_path
):
    wide = build_tiny_model(tmp_path_factory.mktemp("models") / "wide", seed=0, hidden_size=192)
    with pytest.raises(ModelMismatchError) as raised:
        extrapolate(tiny_model_dir, wide, 0.3, tmp_path / "expo")
    message = str(raised.value)
    assert str(tiny_model_dir) in message and str(wide) in message
    assert re.search(
        r"shape of tensor 'lm_head\.weight': \[\d+, 128\] in sft vs \[\d+, 192\] in aligned", message
    )
    assert not (tmp_path / "expo").exists()  # refused before writing anything


def test_a_different_architecture_is_refused_naming_the_config_key(tiny_model_dir, aligned_dir, tmp_path):
    other = shutil.copytree(aligned_dir, tmp_path / "mistral")
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelMismatchError, match="differ in config 'model_type': 'llama' vs 'mistral'"
    ) as raised:
        extrapolate(tiny_model_dir, other, 0.3, tmp_path / "expo")
    assert str(tiny_model_dir) in str(raised.value) and str(other) in str(raised.value)


def test_missing_tensors_are_refused_naming_the_first_missing_name(tiny_model_dir, tmp_path):
    tied = save_perturbed(tiny_model_dir, tmp_path / "tied", seed=5, tied=True)
    with pytest.raises(ModelMismatchError, match="'lm_head.weight' is in sft but missing from aligned"):
        extrapolate(tiny_model_dir, tied, 0.3, tmp_path / "expo")


def test_cli_exits_2_with_a_one_line_message_on_mismatched_models(
    tiny_model_dir, tmp_path_factory, tmp_path, capsys
):
    wide = build_tiny_model(tmp_path_factory.mktemp("models") / "wide2", seed=0, hidden_size=192)
    capsys.readouterr()  # drop the build's progress bars
    argv = ["extrapolate", "--sft", str(tiny_model_dir), "--aligned", str(wide), "--weight", "0.3"]
    assert main([*argv, "--out", str(tmp_path / "expo")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("spo-ray: error: cannot extrapolate")
    assert "lm_head.weight" in err and str(wide) in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weight", "nan"], "--weight must be a finite number"),
        (["--grid", "0,x"], "--grid: 'x' is not a number"),
        (["--grid", "0,1,0"], "listed twice"),
        (["--weight", "1", "--set", "loss.alpha=2"], "only apply with --grid"),
        (["--grid", "0,1", "--set", "task.name=synthetic_expert"], "pass --task"),
        (
            ["--grid", "0,1", "--set", "task.name=synthetic_expert", "--task", "nope.json"],
            "--task 'nope.json'",
        ),
    ],
)
def test_cli_exits_2_on_bad_input(tiny_model_dir, aligned_dir, tmp_path, capsys, extra, message):
    argv = [
        "extrapolate",
        "--sft",
        str(tiny_model_dir),
        "--aligned",
        str(aligned_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_output_over_an_input_folder_is_refused_before_any_work(tiny_model_dir, aligned_dir, capsys):
    with pytest.raises(UserError, match="is the aligned folder"):
        extrapolate(tiny_model_dir, aligned_dir, 0.3, aligned_dir)
    argv = ["extrapolate", "--sft", str(tiny_model_dir), "--aligned", str(aligned_dir), "--grid", "0,1"]
    assert main([*argv, "--out", str(tiny_model_dir)]) == 2  # no config or task needed to fail here
    assert "is the sft folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The λ grid on the synthetic expert task


@pytest.fixture(scope="module")
def expert_setup(tiny_model_dir, tmp_path_factory):
    """A 2-prompt task, and an 'aligned' model: the tiny model after a few steps toward softmax(r/α)."""
    root = tmp_path_factory.mktemp("expert")
    task = SyntheticExpertTask.build(seed=0, num_prompts=2, num_candidates=3)
    task.save(root / "task.json")
    toward_target = SyntheticExpertTask(
        task.prompts, task.candidates, task.rewards, task.target_distribution(1.0).tolist()
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: 2 threads on 2 shared cores ran 40x slower here
    try:
        fit_reference(tiny_model_dir, toward_target, root / "aligned", steps=40, seed=0)
    finally:
        torch.set_num_threads(threads)
    return task, root / "task.json", root / "aligned"


def test_grid_on_the_expert_task_saves_the_lambda_with_the_highest_exact_judge_score(
    tiny_model_dir, expert_setup, tmp_path, capsys
):
    task, task_file, aligned = expert_setup
    out = tmp_path / "best"
    argv = ["extrapolate", "--sft", str(tiny_model_dir), "--aligned", str(aligned), "--out", str(out)]
    settings = ["--set", "task.name=synthetic_expert", "--set", "loss.alpha=1.0", "--task", str(task_file)]
    assert main([*argv, "--grid=-0.5,0,0.5,1,2", *settings]) == 0
    summary = json.loads((out / "grid.json").read_text())
    rows = summary["grid"]
    assert [row["weight"] for row in rows] == [-0.5, 0, 0.5, 1, 2]
    scores = [row["judge_expected_reward"] for row in rows]
    assert max(scores) - min(scores) > 1e-3  # λ really changes the policy
    best = max(range(len(rows)), key=lambda i: scores[i])
    assert summary["metric"] == "judge_expected_reward" and summary["best_weight"] == rows[best]["weight"]
    assert json.loads((out / "expo.json").read_text())["weight"] == rows[best]["weight"]
    assert not (out / "fit_reference.json").exists()  # the aligned model's records are not copied
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    probs = response_distribution(model, AutoTokenizer.from_pretrained(out), task)  # [P, K]
    exact = (probs * task.reward_tensor()).sum(-1) + (1 - probs.sum(-1)) * OUTSIDE_SCORE
    assert exact.mean().item() == pytest.approx(scores[best], abs=1e-9)
    metrics = expert_metrics(probs, task, 1.0)
    assert metrics["expected_reward"] == pytest.approx(rows[best]["expected_reward"], abs=1e-9)
    assert metrics["mass_on_s"] == pytest.approx(rows[best]["mass_on_s"], abs=1e-9)
    table = capsys.readouterr().out
    assert "E[judge]" in table and "<- best" in table and len(table.strip().splitlines()) >= len(rows) + 2
    assert not list(tmp_path.glob(".expo-grid-*"))  # scratch folders removed


@pytest.mark.slow
def test_grid_with_a_judge_samples_each_lambda_from_one_vllm_pool(
    ray_runtime, tiny_model_dir, expert_setup, tmp_path, capsys
):
    task, task_file, aligned = expert_setup
    out = tmp_path / "best"
    argv = ["extrapolate", "--sft", str(tiny_model_dir), "--aligned", str(aligned), "--out", str(out)]
    settings = ["--set", "iterate.eval_samples=4", "--set", "iterate.max_tokens=6", "--task", str(task_file)]
    assert main([*argv, "--grid", "0,1", *settings]) == 0
    summary = json.loads((out / "grid.json").read_text())
    rows = summary["grid"]
    assert summary["metric"] == "mean_score" and [row["weight"] for row in rows] == [0, 1]
    for row in rows:
        assert row["judged"] == task.num_prompts * 4 and row["failures"] == {}
        scores = [s for prompt, texts in zip(task.prompts, row["samples"]) for s in task.score(prompt, texts)]
        assert row["mean_score"] == pytest.approx(sum(scores) / len(scores))
    assert rows[0]["samples"] != rows[1]["samples"]  # the synced weights were used
    best = max(range(2), key=lambda i: rows[i]["mean_score"])
    assert summary["best_weight"] == rows[best]["weight"]
    assert "failures" in capsys.readouterr().out
