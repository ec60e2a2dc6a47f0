"""Model and optimizer options reach the real objects: gradient checkpointing, AdamW betas/eps, attention kernel,
and the LoRA adapter saved on its own as a PEFT folder next to the merged final/."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from spo_ray.config import LoraConfig, ModelConfig, TrainConfig, load_config
from spo_ray.errors import ConfigError
from spo_ray.models.loading import enable_gradient_checkpointing, load_policy_and_reference
from spo_ray.training.checkpointing import MODEL_FILE, trainable_state_dict
from spo_ray.training.export import export_final_model
from spo_ray.training.optim import build_optimizer


def _batch(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["The river moves because water runs downhill.", "Fresh bread is a good reason to wake up."]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def _loss_and_grads(policy, ids, mask):
    policy.train()  # transformers checkpoints only in training mode
    logits = policy(input_ids=ids, attention_mask=mask).logits  # [batch, seq, vocab]
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -(logps * mask[:, 1:]).sum() / mask[:, 1:].sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, lora_rank):
    ids, mask = _batch(tiny_model_dir)
    model_cfg = ModelConfig(lora=LoraConfig(r=lora_rank))
    plain, _, _ = load_policy_and_reference(model_cfg, str(tiny_model_dir), need_reference=False)
    checkpointed, _, _ = load_policy_and_reference(model_cfg, str(tiny_model_dir), need_reference=False)
    checkpointed.load_state_dict(plain.state_dict())  # same LoRA init
    enable_gradient_checkpointing(checkpointed)
    base = checkpointed.get_base_model() if lora_rank else checkpointed
    assert base.is_gradient_checkpointing
    loss, grads = _loss_and_grads(plain, ids, mask)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, ids, mask)
    assert torch.allclose(loss, loss_ckpt, atol=1e-5)
    assert grads.keys() == grads_ckpt.keys() and grads  # adapters (LoRA) or all weights get gradients
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-5), name


def test_adamw_betas_and_epsilon_reach_the_optimizer(tiny_model_dir):
    cfg = load_config(overrides=["train.adam_beta1=0.8", "train.adam_beta2=0.99", "train.adam_epsilon=1e-6"])
    policy, _, _ = load_policy_and_reference(cfg.model, str(tiny_model_dir), need_reference=False)
    optimizer, _ = build_optimizer(policy, cfg.train)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {(g["betas"], g["eps"]) for g in optimizer.param_groups} == {((0.8, 0.99), 1e-6)}
    defaults, _ = build_optimizer(policy, TrainConfig())
    assert {(g["betas"], g["eps"]) for g in defaults.param_groups} == {((0.9, 0.95), 1e-8)}


def test_adam_beta_of_one_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.adam_beta2"):
        load_config(overrides=["train.adam_beta2=1.0"])


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_attn_implementation_reaches_policy_and_reference(tiny_model_dir, kernel):
    cfg = ModelConfig(attn_implementation=kernel)
    policy, reference, _ = load_policy_and_reference(cfg, str(tiny_model_dir), str(tiny_model_dir))
    assert policy.config._attn_implementation == kernel
    assert reference.config._attn_implementation == kernel


def test_lora_adapter_folder_loads_with_peft_and_matches_the_merged_final(tmp_path, tiny_model_dir):
    from peft import PeftModel

    model_cfg = ModelConfig(lora=LoraConfig(r=4))
    policy, _, _ = load_policy_and_reference(model_cfg, str(tiny_model_dir), need_reference=False)
    with torch.no_grad():  # a trained adapter (LoRA's B starts at zero, which would hide a bad export)
        for param in policy.parameters():
            if param.requires_grad:
                param.copy_(0.05 * torch.randn_like(param))
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_file(trainable_state_dict(policy), str(checkpoint / MODEL_FILE))
    final, adapter = tmp_path / "final", tmp_path / "final_adapter"
    export_final_model(model_cfg, str(tiny_model_dir), checkpoint, final, adapter)

    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    size = sum(p.stat().st_size for p in adapter.iterdir())
    merged_size = sum(p.stat().st_size for p in final.iterdir())
    print(f"adapter folder {size} bytes, merged final/ {merged_size} bytes")
    assert size < merged_size / 2
    ids, mask = _batch(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=mask).logits
        loaded = PeftModel.from_pretrained(base, adapter).eval()
        from_adapter = loaded(input_ids=ids, attention_mask=mask).logits
        merged = AutoModelForCausalLM.from_pretrained(final).eval()(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before, merged, atol=1e-3)  # the adapter changes the model
    assert torch.allclose(from_adapter, merged, atol=1e-5)
