"""`final/` holds the trained weights or nothing: a checkpoint that does not fit the model is refused by name."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from spo_ray.config import LoraConfig, ModelConfig
from spo_ray.errors import ConfigError
from spo_ray.models.loading import load_policy_and_reference
from spo_ray.training.checkpointing import MODEL_FILE, trainable_state_dict
from spo_ray.training.export import export_final_model


def _checkpoint(tmp_path, model_cfg: ModelConfig, model_dir: str):
    policy, _, _ = load_policy_and_reference(model_cfg, model_dir, need_reference=False)
    with torch.no_grad():
        for param in policy.parameters():
            if param.requires_grad:
                param.add_(0.01)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_file(trainable_state_dict(policy), str(folder / MODEL_FILE))
    return policy, folder


def test_export_writes_the_checkpoints_weights_in_model_dtype(tmp_path, tiny_model_dir):
    trained, checkpoint = _checkpoint(tmp_path, ModelConfig(), str(tiny_model_dir))
    out = export_final_model(
        ModelConfig(dtype="bfloat16"), str(tiny_model_dir), checkpoint, tmp_path / "final"
    )
    final = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in final.parameters()} == {torch.bfloat16}
    for (name, got), want in zip(final.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(got, want.to(torch.bfloat16)), name


def test_export_refuses_a_checkpoint_of_another_model_naming_the_tensors(tmp_path, tiny_model_dir):
    """A LoRA run's checkpoint exported without LoRA: a non-strict load matched nothing and shipped π_0."""
    _, checkpoint = _checkpoint(tmp_path, ModelConfig(lora=LoraConfig(r=4)), str(tiny_model_dir))
    with pytest.raises(RuntimeError) as info:
        export_final_model(ModelConfig(), str(tiny_model_dir), checkpoint, tmp_path / "final")
    message = str(info.value)
    assert str(checkpoint / MODEL_FILE) in message and "missing tensors" in message
    assert "model.layers.0.self_attn.q_proj.weight" in message  # what the model wanted
    assert "base_model.model.model" in message  # what the checkpoint held instead
    assert not (tmp_path / "final").exists()


def test_config_errors_survive_pickling_as_ray_carries_them_between_processes():
    error = pickle.loads(pickle.dumps(ConfigError("model.reference_path", "is wrong")))
    assert isinstance(error, ConfigError) and error.key == "model.reference_path"
    assert str(error) == "config key 'model.reference_path': is wrong"
