"""Pool set-up: clear errors, pools from a RolloutConfig, balancing over actors, hung engines."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spo_ray.config import RolloutConfig
from spo_ray.errors import UserError
from spo_ray.rollout import RolloutPool, SamplingSettings


@pytest.fixture(scope="module")
def head_dim_16_model(tmp_path_factory, tiny_model_dir):
    """A Llama with hidden size 32 and 2 heads (head_dim 16), sharing the tiny tokenizer."""
    out = tmp_path_factory.mktemp("models") / "head16"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, out / name)
    tiny = LlamaConfig.from_pretrained(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=tiny.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=tiny.bos_token_id,
        eos_token_id=tiny.eos_token_id,
        pad_token_id=tiny.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_a_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RolloutPool(tmp_path / "no-such-model", backend="hf")
    with pytest.raises(UserError, match="no config.json"):
        RolloutPool(tmp_path, backend="hf")


def test_gpu_transports_need_vllm_on_gpu_actors(tiny_model_dir):
    with pytest.raises(UserError, match="transport 'nccl' needs backend='vllm' on GPU actors"):
        RolloutPool(tiny_model_dir, backend="vllm", transport="nccl")


def test_an_unknown_cpu_weights_mode_is_refused_before_any_engine_starts(tiny_model_dir):
    with pytest.raises(
        UserError, match="rollout.cpu_weights: 'fast' is not one of 'in_place', 'packed', 'shared'"
    ):
        RolloutPool(tiny_model_dir, backend="vllm", cpu_weights="fast")


@pytest.mark.slow
def test_vllm_cpu_rejects_a_head_dim_16_model_naming_the_head_size(ray_runtime, head_dim_16_model):
    with pytest.raises(UserError, match=r"head size is 16.*supports only \[.*64.*\].*backend='hf'"):
        RolloutPool(head_dim_16_model, backend="vllm")


@pytest.mark.slow
def test_the_hf_fallback_serves_that_model_with_the_configs_sampling_defaults(ray_runtime, head_dim_16_model):
    cfg = RolloutConfig(backend="hf", max_tokens=5, samples_per_prompt=3, temperature=0.7, seed=4)
    with RolloutPool.from_config(head_dim_16_model, cfg) as pool:
        (samples,) = pool.generate(["What is the red apple?"])
    assert len(samples) == 3 and all(1 <= len(s.token_ids) <= 5 for s in samples)


@pytest.mark.slow
def test_prompts_are_balanced_over_spread_actors_and_seeded_calls_repeat(ray_runtime, tiny_model_dir):
    with RolloutPool(tiny_model_dir, num_actors=2, backend="hf", colocate=False) as pool:
        prompts = [[1, 280, 201, 364 + i] for i in range(8)]
        first = pool.generate(prompts, n=2, max_tokens=6, seed=11)
        again = pool.generate(prompts, n=2, max_tokens=6, seed=11)
        assert [s.token_ids for p in first for s in p] == [s.token_ids for p in again for s in p]
        assert [info["prompts_served"] for info in pool.engine_info()] == [8, 8]


def _seconds_per_call(model_dir, work: dict) -> float:
    """How long one generate call of `work` takes on this machine now (the HF engine's own generate)."""
    from spo_ray.rollout.engines.hf_engine import HfEngine

    engine = HfEngine(str(model_dir), 0, {})
    engine.start()
    settings = SamplingSettings(n=1, max_tokens=work["max_tokens"], temperature=1.0, top_p=1.0)
    seeds = list(range(len(work["prompts"])))
    engine.generate(work["prompts"], settings, seeds)  # warm-up
    start = time.perf_counter()
    engine.generate(work["prompts"], settings, seeds)
    return time.perf_counter() - start


@pytest.mark.slow
def test_only_running_calls_can_time_out_and_a_hung_engine_is_replaced(ray_runtime, tiny_model_dir):
    work = {"prompts": [[1, 280, 201]] * 8, "max_tokens": 48}
    # The deadline is sized to this machine's speed right now, so a loaded machine changes the scale only.
    timeout_s = max(4.0, 6 * _seconds_per_call(tiny_model_dir, work))
    with RolloutPool(tiny_model_dir, backend="hf", timeout_s=timeout_s) as pool:
        start = time.perf_counter()
        pool.generate(**work)
        one_call = time.perf_counter() - start
        # Queued behind each other on one engine, these take longer than timeout_s in total.
        pending = [pool.generate_async(**work) for _ in range(int(1.5 * timeout_s / one_call) + 2)]
        assert all(len(p.result()) == 8 for p in pending)
        (before,) = pool.engine_info()
        assert before["replaced"] == 0

        os.kill(before["pid"], signal.SIGSTOP)  # alive but never answers; replacing it SIGKILLs it
        (samples,) = pool.generate([[1, 280, 201]], n=2, max_tokens=4)
        (after,) = pool.engine_info()
    assert len(samples) == 2 and after["pid"] != before["pid"] and after["replaced"] == 1


def test_rollout_placement_keys_parse_and_bad_ones_name_the_key():
    from spo_ray.config import load_config
    from spo_ray.errors import ConfigError

    cfg = load_config(None, ["rollout.resources.rollout=1", "rollout.node_labels={pool: rollout}"])
    assert cfg.rollout.resources == {"rollout": 1.0} and cfg.rollout.node_labels == {"pool": "rollout"}
    with pytest.raises(ConfigError, match=r"rollout.resources.CPU.*rollout.num_cpus_per_actor"):
        load_config(None, ["rollout.resources.CPU=2"])
    with pytest.raises(ConfigError, match=r"rollout.resources.rollout.*greater than 0"):
        load_config(None, ["rollout.resources.rollout=0"])
    with pytest.raises(ConfigError, match=r"rollout.resources.*expected a mapping"):
        load_config(None, ["rollout.resources=rollout"])


@pytest.mark.slow
def test_a_placement_no_live_node_offers_is_refused_at_once_saying_how_to_start_one(
    ray_runtime, tiny_model_dir
):
    cfg = RolloutConfig(backend="hf", resources={"rollout": 1}, node_labels={"pool": "rollout"})
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"no live node.*rollout.resources=\{'rollout': 1\}.*--resources"):
        RolloutPool.from_config(tiny_model_dir, cfg)
    with pytest.raises(UserError, match=r"rollout.node_labels=\{'pool': 'rollout'\}.*--labels pool=rollout"):
        RolloutPool(tiny_model_dir, backend="hf", node_labels={"pool": "rollout"})
    assert time.perf_counter() - started < 10  # not after start_timeout_s
