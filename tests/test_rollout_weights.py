"""What the trainer sends (state_dict_for_sync, object-store buckets, safetensors payloads) and what the pool
checks first."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from spo_ray.errors import UserError
from spo_ray.rollout import SamplingSettings, state_dict_for_sync
from spo_ray.rollout.serialization import (
    buckets_to_state_dict,
    bytes_to_state_dict,
    state_dict_to_buckets,
    state_dict_to_bytes,
)
from spo_ray.rollout.types import check_prompts, derive_seed


@pytest.fixture()
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_state_dict_for_sync_merges_lora_like_merge_and_unload_without_touching_the_model(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"]
        ),
    )
    with torch.no_grad():  # lora_B starts at zero, the saved lm_head copy equal: make both differ
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}

    synced = state_dict_for_sync(peft_model)

    after = dict(peft_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "the training model must not change"
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert list(synced) == list(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(synced[name], tensor, rtol=0, atol=1e-6, msg=name)
    base_q = peft_model.get_base_model().state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert not torch.allclose(synced["model.layers.0.self_attn.q_proj.weight"], base_q)  # the delta is in
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in synced.values())


def test_state_dict_for_sync_unwraps_ddp_style_wrappers_and_keeps_hf_names(model):
    class Wrapper(nn.Module):  # DistributedDataParallel and FSDP expose the model as `.module`
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

    synced = state_dict_for_sync(Wrapper(Wrapper(model)))
    assert list(synced) == list(model.state_dict())
    assert "model.embed_tokens.weight" in synced and "lm_head.weight" in synced
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in synced.values())


def test_safetensors_payload_round_trips_and_writes_tied_weights_once():
    shared = torch.randn(6, 4)
    state = {"embed.weight": shared, "lm_head.weight": shared, "scale": torch.randn(3).bfloat16()}
    state["t"] = torch.randn(4, 5).t()  # not contiguous
    decoded = bytes_to_state_dict(state_dict_to_bytes(state))
    assert set(decoded) == {"embed.weight", "scale", "t"}
    for name, tensor in decoded.items():
        assert torch.equal(tensor, state[name]) and tensor.dtype == state[name].dtype


def test_buckets_view_the_tensors_group_by_dtype_and_read_back_exactly():
    shared = torch.randn(6, 4)
    state = {"embed.weight": shared, "lm_head.weight": shared, "scale": torch.randn(3).bfloat16()}
    state.update({f"w{i}": torch.randn(8, 8) for i in range(3)})  # 256 bytes each
    state["t"] = torch.randn(4, 5).t()  # not contiguous: the one tensor copied here
    buckets = state_dict_to_buckets(state, bucket_bytes=600)
    for bucket in buckets:  # one dtype per bucket, at most 600 bytes unless a single tensor is larger
        assert len(set(bucket["dtypes"])) == 1
        assert sum(a.nbytes for a in bucket["arrays"]) <= 600 or len(bucket["arrays"]) == 1
    assert len(buckets) == 3  # bfloat16 alone; float32 [96 + 256], [256 + 256 + 80] bytes
    arrays = {n: a for b in buckets for n, a in zip(b["names"], b["arrays"])}
    assert arrays["w0"].ctypes.data == state["w0"].data_ptr()  # a view: ray.put makes the only copy
    decoded = buckets_to_state_dict(buckets)
    assert set(decoded) == {"embed.weight", "scale", "t", "w0", "w1", "w2"}
    for name, tensor in decoded.items():
        assert torch.equal(tensor, state[name]) and tensor.dtype == state[name].dtype


def test_sampling_parameters_out_of_range_name_the_parameter():
    assert SamplingSettings(n=2, max_tokens=8, temperature=0.0, top_p=1.0).n == 2
    for bad in [{"n": 0}, {"n": 2000}, {"n": 1.5}, {"max_tokens": 0}, {"temperature": -0.1}, {"top_p": 0}]:
        (name,) = bad
        with pytest.raises(UserError, match=f"sampling parameter {name}="):
            SamplingSettings(**bad)


def test_prompts_may_be_text_chat_messages_or_token_ids_and_nothing_else():
    messages = [{"role": "user", "content": "hi"}]
    assert check_prompts(["hi", messages, (1, 2, 3)]) == ["hi", messages, [1, 2, 3]]
    for bad in ["hi", [[]], [[1, -2]], [[{"role": "user"}]], [None], [3.5]]:
        with pytest.raises(UserError):
            check_prompts(bad)


def test_per_prompt_seeds_differ_across_calls_prompts_and_their_n_samples():
    seeds = [derive_seed(0, call, i) for call in range(20) for i in range(50)]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [derive_seed(0, call, i) for call in range(20) for i in range(50)]
    children = {s + k for s in seeds for k in range(1024)}  # vLLM seeds sample k with seed + k
    assert len(children) == len(seeds) * 1024
    assert derive_seed(1, 0, 0) != derive_seed(0, 0, 0)
