"""RolloutPool on real Ray with the tiny model, for both backends (vLLM CPU and the HF fallback).

One pool per backend is shared by the module (a vLLM engine takes ~15 s to start); the test that
kills an engine runs last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spo_ray.data.templating import Templater
from spo_ray.errors import UserError
from spo_ray.rollout import PendingSamples, RolloutPool, Sample, state_dict_for_sync
from spo_ray.rollout.checks import logprob_gap
from spo_ray.rollout.serialization import state_dict_to_bytes

pytestmark = pytest.mark.slow

TOKEN_PROMPT = [1, 280, 201, 364, 295]


@pytest.fixture(scope="module")
def long_context_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model claiming a 2^20-token context, as real models claim 8k-128k: its full-length KV cache is
    over the CPU engine's fixed budget, so vLLM starts only because the engine caps max_model_len to it."""
    folder = tmp_path_factory.mktemp("long_context") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1 << 20
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module", params=["hf", "vllm"])
def pool(request, ray_runtime, tiny_model_dir, long_context_model_dir):
    # vLLM with LoRA support, as RolloutPool.from_config starts it for model.lora.r = 8, and no max_model_len
    if request.param == "vllm":
        options = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1}
        rollout = RolloutPool(long_context_model_dir, backend="vllm", seed=0, timeout_s=120, **options)
    else:
        rollout = RolloutPool(tiny_model_dir, backend="hf", seed=0, timeout_s=120)
    yield rollout
    rollout.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def perturbed(model, scale: float, seed: int):
    """A copy of `model` with Gaussian noise on every weight."""
    copy = AutoModelForCausalLM.from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in copy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return copy


def flat(samples: list[list[Sample]]) -> list[Sample]:
    return [s for per_prompt in samples for s in per_prompt]


def test_generate_returns_well_formed_samples_for_string_chat_and_token_id_prompts(pool, tiny_model_dir):
    messages = [{"role": "user", "content": "Explain fresh bread?"}]
    prompts = ["What is the blue sky?", messages, TOKEN_PROMPT]
    samples = pool.generate(prompts, n=2, max_tokens=12)
    assert len(samples) == 3 and all(len(per_prompt) == 2 for per_prompt in samples)
    templater = Templater.from_path(str(tiny_model_dir), max_length=512, max_prompt_length=256)
    expected = templater.encode_prompts([[{"role": "user", "content": "What is the blue sky?"}], messages])
    assert [samples[0][0].prompt_token_ids, samples[1][0].prompt_token_ids] == expected  # as in training
    assert samples[2][0].prompt_token_ids == TOKEN_PROMPT and samples[2][0].prompt == TOKEN_PROMPT
    for sample in flat(samples):
        assert 1 <= len(sample.token_ids) <= 12
        assert len(sample.logprobs) == len(sample.token_ids)
        assert all(lp <= 0 and lp == lp for lp in sample.logprobs)
        assert sample.finish_reason in ("stop", "length") and isinstance(sample.text, str)
        assert sample.policy_version == pool.policy_version


def test_same_seed_gives_same_samples_and_other_requests_differ(pool):
    prompts = [TOKEN_PROMPT, TOKEN_PROMPT, "Tell me about the red apple?"]
    first = pool.generate(prompts, n=2, max_tokens=10, seed=123)
    again = pool.generate(prompts, n=2, max_tokens=10, seed=123)
    assert [s.token_ids for s in flat(first)] == [s.token_ids for s in flat(again)]
    unseeded = [pool.generate(prompts, n=2, max_tokens=10) for _ in range(2)]
    token_lists = [tuple(s.token_ids) for call in [first, *unseeded] for s in flat(call)]
    assert len(set(token_lists)) == len(token_lists)  # across calls, prompts, and the n samples


def test_synced_weights_give_rollout_logprobs_matching_hf_and_carry_the_version(pool, hf_model):
    policy = perturbed(hf_model, scale=0.05, seed=1)
    weights = state_dict_for_sync(policy)
    moved = pool.sync_weights(weights, version=3)
    assert pool.policy_version == 3
    # one node: Ray's object directory lists the payload here only, so nothing crossed to another node
    here = ray.get_runtime_context().get_node_id()
    assert moved["copies_on_nodes"] == moved["engine_nodes"] == [here] and moved["bytes_to_other_nodes"] == 0
    payload = state_dict_to_bytes(weights).nbytes
    assert 0 <= moved["bytes"] - payload < 4096  # the safetensors payload plus Ray's metadata
    samples = flat(pool.generate(["Why does the river move?", TOKEN_PROMPT], n=2, max_tokens=24))
    assert {s.policy_version for s in samples} == {3}
    gap = logprob_gap(policy, samples)
    stale_gap = logprob_gap(hf_model, samples)
    print(
        f"\n[{pool.backend}] rollout vs HF log-prob MAE after sync: {gap:.2e} (vs unsynced: {stale_gap:.2e})"
    )
    assert gap < 1e-3 < stale_gap
    if pool.backend == "vllm":  # rollout.cpu_weights=in_place (default): the engine loads syncs in place
        assert [info["weights_load"] for info in pool.engine_info()] == ["in_place"]


def test_samples_that_stop_end_with_the_eos_token(pool, hf_model, tiny_model_dir):
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    policy = perturbed(hf_model, scale=0.0, seed=0)
    with torch.no_grad():  # a shared direction in every embedding that the eos row reads: eos ~1/4 a step
        policy.model.embed_tokens.weight[:, 0] += 10.0
        policy.lm_head.weight[eos, 0] = 0.6
    pool.sync_weights(state_dict_for_sync(policy), version=4)
    samples = flat(pool.generate([TOKEN_PROMPT, "What is two numbers?"], n=4, max_tokens=16, seed=5))
    stopped = [s for s in samples if s.finish_reason == "stop"]
    assert stopped, "the eos-heavy policy should stop within 16 tokens"
    for sample in samples:
        assert (sample.token_ids[-1] == eos) == (sample.finish_reason == "stop")
        assert eos not in sample.token_ids[:-1]
        if sample.finish_reason == "length":
            assert len(sample.token_ids) == 16
    assert logprob_gap(policy, samples) < 1e-3


def test_a_lora_sync_sends_the_adapter_alone_and_rollout_logprobs_match_the_trainer(pool, hf_model):
    from peft import LoraConfig, get_peft_model

    from spo_ray.rollout.weights import lora_sync_payload

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    trainer = get_peft_model(
        perturbed(hf_model, 0.05, seed=4), LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    )

    def new_adapter(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in trainer.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)

    new_adapter(seed=1)
    base, adapter = lora_sync_payload(trainer, with_base=True)  # the first sync of a run carries the base
    if not pool.lora_adapters:
        with pytest.raises(UserError, match="cannot serve LoRA adapters"):
            pool.sync_weights(base, 8, lora=adapter)
        return
    first = pool.sync_weights(base, 8, lora=adapter)
    samples = flat(pool.generate([TOKEN_PROMPT, "Why does the river move?"], n=2, max_tokens=16))
    assert {s.policy_version for s in samples} == {8} and logprob_gap(trainer, samples) < 1e-3
    new_adapter(seed=2)
    no_base, adapter = lora_sync_payload(trainer, with_base=False)
    moved = pool.sync_weights(no_base, 9, lora=adapter)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
    assert 0 <= moved["bytes"] - adapter_bytes < 4096 and moved["bytes"] * 8 < first["bytes"]
    samples = flat(pool.generate([TOKEN_PROMPT, "Why does the river move?"], n=2, max_tokens=16))
    gap = logprob_gap(trainer, samples)
    with trainer.disable_adapter():
        base_gap = logprob_gap(trainer, samples)
    print(f"\n[vllm] adapter sync ({moved['bytes']} of {first['bytes']} bytes): log-prob MAE {gap:.2e}")
    assert {s.policy_version for s in samples} == {9} and gap < 1e-3 < base_gap
    pool.sync_weights(state_dict_for_sync(hf_model), 10)  # full weights drop the adapter
    assert logprob_gap(hf_model, flat(pool.generate([TOKEN_PROMPT], n=2, max_tokens=16))) < 1e-3


def test_pool_is_usable_from_inside_another_ray_task(pool, hf_model):
    @ray.remote(num_cpus=0)
    def trainer_rank0(rollout: RolloutPool, state_dict, version):
        rollout.sync_weights(state_dict, version)
        return rollout.generate([TOKEN_PROMPT], n=2, max_tokens=6), rollout.policy_version

    policy = perturbed(hf_model, scale=0.05, seed=2)
    samples, version = ray.get(trainer_rank0.remote(pool, state_dict_for_sync(policy), 5), timeout=120)
    assert version == 5 and pool.policy_version == 5
    assert {s.policy_version for s in flat(samples)} == {5}
    assert logprob_gap(policy, flat(samples)) < 1e-3


def test_generate_async_returns_pending_samples_while_the_caller_works(pool):
    pending = pool.generate_async([TOKEN_PROMPT] * 4, n=2, max_tokens=32)
    assert isinstance(pending, PendingSamples)
    busy = sum(i * i for i in range(10_000))  # the trainer's step would run here
    samples = pending.result(timeout=120)
    assert busy and len(samples) == 4 and pending.done()


def test_a_queued_sync_returns_while_the_engine_generates_and_the_next_generation_uses_it(pool, hf_model):
    old_version = pool.policy_version
    running = pool.generate_async([TOKEN_PROMPT] * 16, n=4, max_tokens=200, seed=11)
    policy = perturbed(hf_model, scale=0.05, seed=4)
    weights = {name: tensor.clone() for name, tensor in state_dict_for_sync(policy).items()}
    queued = pool.sync_weights(weights, version=old_version + 1, wait=False)
    # a waiting sync would have queued behind the generation: this one returned while it still runs
    assert queued == {"queued": True, "version": old_version + 1} and not running.done()
    with torch.no_grad():  # the optimizer's next step: the payload was copied, the engines never see this
        for tensor in weights.values():
            tensor.zero_()
    assert {s.policy_version for s in flat(running.result(timeout=300))} == {old_version}
    samples = flat(pool.generate([TOKEN_PROMPT, "Why does the river move?"], n=2, max_tokens=16))
    assert {s.policy_version for s in samples} == {old_version + 1}
    assert pool.policy_version == old_version + 1
    assert logprob_gap(policy, samples) < 1e-3
    report = pool.wait_for_weights()
    assert report["version"] == old_version + 1 and report["load_seconds"] > 0 and report["bytes"] > 0


def test_a_queued_load_that_fails_is_raised_by_the_next_call_and_the_old_weights_stay(pool, hf_model):
    version = pool.policy_version + 1
    pool.sync_weights(state_dict_for_sync(hf_model), version)
    bad = {"model.embed_tokens.weight": torch.zeros(3, 5)}  # no model has this shape
    assert pool.sync_weights(bad, version=version + 1, wait=False)["queued"]
    with pytest.raises(UserError, match=f"weights of version {version + 1} do not fit"):
        pool.wait_for_weights()
    assert pool.wait_for_weights()["version"] == version  # raised once; the last good load is still served
    assert pool.policy_version == version
    assert {s.policy_version for s in flat(pool.generate([TOKEN_PROMPT], n=2, max_tokens=6))} == {version}


def test_bad_sampling_parameters_and_prompts_raise_clear_errors(pool):
    for bad, word in [
        ({"n": 0}, "n=0"),
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_p": 0.0}, "top_p=0.0"),
    ]:
        with pytest.raises(UserError, match=word):
            pool.generate([TOKEN_PROMPT], **bad)
    with pytest.raises(UserError, match="prompts must be a list"):
        pool.generate("just a string")
    with pytest.raises(UserError, match="outside the vocabulary"):
        pool.generate([[1, 10_000_000]])
    with pytest.raises(UserError, match="exceed the engine's max length"):
        pool.generate([TOKEN_PROMPT * 100], max_tokens=10_000_000)  # past any context the engine holds


def test_shared_cpu_weights_serve_the_object_store_tensors_while_the_store_fills(
    ray_runtime, tiny_model_dir, hf_model
):
    """rollout.cpu_weights=shared: the engine's whole-tensor parameters (embedding, LM head, norms, o_proj,
    down_proj) are the synced tensors in the object store, not copies. They stay valid once the trainer's
    tensors are gone and other objects fill the store (the pool keeps the served version's refs, to load a
    replacement engine), a later sync replaces them, and a replaced engine shares again."""
    rollout = RolloutPool(tiny_model_dir, backend="vllm", seed=0, timeout_s=120, cpu_weights="shared")
    try:
        prompts = [TOKEN_PROMPT, "Why does the river move?"]
        for version, seed in ((1, 11), (2, 12)):
            policy = perturbed(hf_model, scale=0.05, seed=seed)
            rollout.sync_weights(state_dict_for_sync(policy), version=version)
            (info,) = rollout.engine_info()
            assert info["weights_load"] == "in_place"
            whole = [
                p
                for n, p in policy.named_parameters()
                if not n.endswith(
                    ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
                )
            ]
            assert info["shared_weight_bytes"] == sum(p.numel() * p.element_size() for p in whole)
            del policy
            garbage = [ray.put(torch.randn(1 << 20).numpy()) for _ in range(64)]  # 256 MB of other objects
            del garbage
            samples = flat(rollout.generate(prompts, n=2, max_tokens=16))
            assert {s.policy_version for s in samples} == {version}
            expected = perturbed(hf_model, scale=0.05, seed=seed)
            assert logprob_gap(expected, samples) < 1e-3 < logprob_gap(hf_model, samples)
        # a load that fails: the engine is replaced, and the new one serves version 2's objects, shared too
        bad = {"model.embed_tokens.weight": torch.zeros(3, 5)}
        with pytest.raises(UserError, match="weights of version 3 do not fit"):
            rollout.sync_weights(bad, version=3)
        samples = flat(rollout.generate(prompts, n=2, max_tokens=16))
        assert {s.policy_version for s in samples} == {2} and logprob_gap(expected, samples) < 1e-3
        (replaced,) = rollout.engine_info()
        assert replaced["replaced"] == 1 and replaced["shared_weight_bytes"] == info["shared_weight_bytes"]
    finally:
        rollout.shutdown()


def test_a_killed_engine_is_replaced_and_the_call_returns_with_the_latest_weights(pool, hf_model):
    policy = perturbed(hf_model, scale=0.05, seed=3)
    pool.sync_weights(state_dict_for_sync(policy), version=7)
    (before,) = pool.engine_info()
    pending = pool.generate_async([TOKEN_PROMPT] * 16, n=4, max_tokens=200, seed=9)
    time.sleep(1.0)
    assert not pending.done(), "generation should still be running when the engine is killed"
    os.kill(before["pid"], signal.SIGKILL)
    samples = pending.result(timeout=300)
    (after,) = pool.engine_info()
    assert after["pid"] != before["pid"] and after["replaced"] == before["replaced"] + 1
    assert after["policy_version"] == 7 and pool.policy_version == 7
    assert len(samples) == 16 and {s.policy_version for s in flat(samples)} == {7}
    gap = logprob_gap(policy, flat(samples)[:8])
    print(f"\n[{pool.backend}] after replacement, rollout vs HF log-prob MAE: {gap:.2e}")
    assert gap < 1e-3
