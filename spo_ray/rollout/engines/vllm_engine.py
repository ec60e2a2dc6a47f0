"""The vLLM engine (CPU build here, GPU build on clusters), run in-process inside its Ray actor."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

from spo_ray.errors import UserError
from spo_ray.rollout.engines.base import RawCompletion, RolloutEngine
from spo_ray.rollout.engines.vllm_worker import CPU_WEIGHTS, keep_cpu_linear_weights
from spo_ray.rollout.serialization import state_dict_to_bytes
from spo_ray.rollout.types import SamplingSettings

# vLLM workers gain the methods of this class (reached with LLM.collective_rpc).
WORKER_EXTENSION = "spo_ray.rollout.engines.vllm_worker.WeightReloadExtension"

# The engine core runs inside the Ray actor's process rather than in a spawned child: the actor's
# pid is the engine's pid, a killed actor takes its engine with it, and no `__main__` guard is needed.
ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

CPU_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,  # torch.compile on CPU costs minutes of start-up for little gain here
    # On CPU, gpu_memory_utilization is a fraction of *host* memory; a fixed KV budget is safer.
    "kv_cache_memory_bytes": 256 << 20,
    # A prefill split over steps makes vLLM rewind the seeded request's generator, which the CPU
    # generator cannot do ("CPU Generator does not use offset"): measured to fail 8 prompts x n=32.
    "enable_chunked_prefill": False,
}


def cpu_max_model_len(config: Any, options: dict[str, Any]) -> int:
    """The model's context length, capped at what the CPU engine's fixed KV budget holds: vLLM refuses to
    start when one request of the model's full context would not fit (SmolLM2's 8,192 positions need 0.35 GiB
    in float32), and a longer prompt is refused per request instead. 90% of the budget, in 16-token blocks."""
    text = getattr(config, "text_config", None) or config
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype_bytes = 2 if str(options.get("dtype")) in ("bfloat16", "float16", "half") else 4
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes  # keys and values
    fits = int(0.9 * options["kv_cache_memory_bytes"]) // per_token // 16 * 16
    return max(16, min(int(getattr(text, "max_position_embeddings", fits) or fits), fits))


class VllmEngine(RolloutEngine):
    """`vllm.LLM` with in-place weight reloads, LoRA adapters (engine option `enable_lora`) and per-prompt
    seeds."""

    llm: Any = None
    weights_load: str = "reload"  # how a sync loads full weights: "in_place" or "reload" (vllm_worker.py)
    share_weights = False  # rollout.cpu_weights=shared (CPU): whole tensors are served from the store
    lora_request: Any = None  # the adapter every generation uses (None: the loaded weights alone)
    adapters_loaded = 0  # vLLM adapter ids: 1, 2, ... (never reused within an engine)

    def start(self) -> None:
        from transformers import AutoConfig
        from vllm.platforms import current_platform

        config = AutoConfig.from_pretrained(self.model_path)
        options = dict(self.engine_options)
        cpu_weights = options.pop("cpu_weights", CPU_WEIGHTS[0])  # rollout.cpu_weights, ours, not vLLM's
        # vLLM's "auto" turns float32 checkpoints into 16-bit; serve the stored dtype (float32 when
        # the folder does not say, as transformers loads it) so rollout log-probs match the trainer's.
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        options.setdefault("dtype", str(stored).removeprefix("torch.") if stored else "float32")
        if current_platform.is_cpu():
            self._check_cpu_head_size(config)
            for key, value in CPU_DEFAULTS.items():
                options.setdefault(key, value)
            if "max_model_len" not in options and "kv_cache_memory_bytes" in options:
                options["max_model_len"] = cpu_max_model_len(config, options)
            if cpu_weights != "packed":
                keep_cpu_linear_weights()
        self.share_weights = cpu_weights == "shared" and current_platform.is_cpu()
        from vllm import LLM

        from spo_ray.logs import configure_logging, is_quiet

        configure_logging()  # the level the driver passed in this actor's environment
        options.setdefault("use_tqdm_on_load", not is_quiet())
        try:
            self.llm = LLM(
                model=self.model_path, seed=self.seed, worker_extension_cls=WORKER_EXTENSION, **options
            )
        except Exception as exc:
            raise UserError(
                f"vLLM cannot serve the model at {self.model_path}: {type(exc).__name__}: {exc} "
                "(use backend='hf' for models vLLM does not support)"
            ) from None
        in_place = self.llm.collective_rpc("weights_load_in_place")
        self.weights_load = "in_place" if all(in_place) else "reload"

    def info(self) -> dict[str, Any]:
        """Also how syncs load (`weights_load`) and how many bytes of the served weights view the object store
        (`shared_weight_bytes`, rollout.cpu_weights=shared)."""
        shared = sum(self.llm.collective_rpc("shared_weight_bytes")) if self.share_weights else 0
        return {**super().info(), "weights_load": self.weights_load, "shared_weight_bytes": shared}

    def _check_cpu_head_size(self, config: Any) -> None:
        """vLLM's CPU attention supports a few head sizes; fail with the reason before loading."""
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        config = getattr(config, "text_config", None) or config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in supported:
            raise UserError(
                f"vLLM's CPU build cannot serve the model at {self.model_path}: its attention head size is "
                f"{head_dim}, and CPU attention supports only {supported}. Use backend='hf', or a model "
                "with a supported head size (the tiny model uses 64)."
            )

    def _tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def _limits(self) -> tuple[int, int]:
        model_config = self.llm.llm_engine.model_config
        return model_config.get_vocab_size(), model_config.max_model_len

    def _load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        parallel = self.llm.llm_engine.vllm_config.parallel_config
        if parallel.world_size > 1:  # workers in other processes: RPC arguments are serialized
            self.llm.collective_rpc("reload_safetensors", args=(state_dict_to_bytes(state_dict).tobytes(),))
        else:  # the worker runs in this process (ACTOR_ENV): it reads the shared-memory tensors directly
            self.llm.collective_rpc(
                "reload_tensors", args=(state_dict,), kwargs={"share": self.share_weights}
            )
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def _load_adapter(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], version: int) -> None:
        """vLLM loads adapters from a folder: write it (on this engine's node), load it under a new id, and
        unload the previous one; every later generation uses it."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self.llm.llm_engine.vllm_config.lora_config is None:
            raise UserError(
                "the rollout engines were started without enable_lora, so they cannot serve a LoRA adapter; "
                "build the pool with RolloutPool.from_config(..., lora_rank=model.lora.r), or set "
                "rollout.lora_sync=merged"
            )
        folder = tempfile.mkdtemp(prefix=f"spo_ray-lora-v{version}-")
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
            json.dump(config, fh)
        self._drop_adapter()  # max_loras=1: one adapter in memory at a time
        self.adapters_loaded += 1
        request = LoRARequest(f"policy-v{version}", self.adapters_loaded, folder)
        try:
            self.llm.llm_engine.add_lora(request)  # loads now: a bad adapter fails here, not mid-generation
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.lora_request = request
        self.llm.reset_prefix_cache()

    def _drop_adapter(self) -> None:
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            shutil.rmtree(self.lora_request.lora_path, ignore_errors=True)
            self.lora_request = None

    def _generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings, seeds: list[int]
    ) -> list[list[RawCompletion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=settings.n,
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=seed,
                logprobs=0,  # the sampled token's log-prob only
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        results = []
        for output in outputs:
            completions = []
            for choice in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(choice.token_ids)
                logprobs = [step[token].logprob for step, token in zip(choice.logprobs, tokens)]
                completions.append((tokens, logprobs, choice.finish_reason or "length", choice.text))
            results.append(completions)
        return results

    # -- vLLM's weight-transfer engines (GPU transports), driven by spo_ray.rollout.transports ----
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Join the trainer's transfer group (NCCL) or accept its IPC handles."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, version: int) -> None:
        """Finish the update, drop prefix KV computed with old weights, stamp `version`."""
        self.llm.finish_weight_update()
        self._drop_adapter()  # full weights replace the model
        self.llm.reset_prefix_cache()
        self.policy_version = version
