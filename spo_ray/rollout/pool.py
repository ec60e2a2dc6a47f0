"""RolloutPool: the one object callers use to sample from the policy and push new weights to it.

A pool is a small picklable client of a rollout manager actor (see manager.py), so it can be
handed to Ray Train workers through `train_loop_config`; every copy drives the same engines.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from spo_ray.errors import UserError
from spo_ray.logs import process_env
from spo_ray.rollout.engines.vllm_worker import CPU_WEIGHTS
from spo_ray.rollout.manager import EngineSpec, RolloutManager
from spo_ray.rollout.placement import Placement
from spo_ray.rollout.transports import ObjectStoreTransport, WeightTransport, make_transport
from spo_ray.rollout.types import Prompt, RolloutError, Sample, SamplingSettings, check_prompts, raise_cause
from spo_ray.rollout.weights import LoraAdapter

BACKENDS = ("vllm", "hf")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
TRANSPORTS = ("object_store", "nccl", "cuda_ipc")


def _wait(ref: ray.ObjectRef, timeout_s: float, what: str) -> Any:
    """`ray.get` with a deadline; remote errors re-raised as themselves, failures as RolloutError."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        raise RolloutError(f"{what}: no answer within {timeout_s:g} s") from None
    except RayTaskError as exc:
        raise_cause(exc)
    except RayError as exc:
        raise RolloutError(f"{what}: the rollout manager failed: {type(exc).__name__}: {exc}") from None


class PendingSamples:
    """Samples being generated; `result()` waits for them (never longer than the pool's bound)."""

    def __init__(self, ref: ray.ObjectRef, bound_s: float):
        self.ref = ref
        self.bound_s = bound_s

    def done(self) -> bool:
        """True when `result()` would return (or raise) without waiting."""
        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self, timeout: float | None = None) -> list[list[Sample]]:
        """One list of samples per prompt, in prompt order; RolloutError after `timeout` seconds."""
        return _wait(self.ref, self.bound_s if timeout is None else timeout, "generate")


class RolloutPool:
    """Rollout engines (vLLM or the HF fallback) in Ray actors, behind one manager actor.

    Placement: `resources` (custom Ray resources, e.g. `{"rollout": 1}`) and `node_labels` are hard
    requirements of every engine actor; `colocate=True` adds a soft preference for one node: first the
    node of the process that builds the pool, then the node of whoever calls `prefer_this_node()` (the
    trainers' rank 0 does, so engines end up next to the trainers even when the driver runs elsewhere,
    as under `ray job submit`); False spreads engines over the cluster. `engine_options` go to
    `vllm.LLM` (e.g. `max_model_len`, `kv_cache_memory_bytes`, `gpu_memory_utilization`, `dtype`)
    or to `from_pretrained` for `backend="hf"` (`dtype`, `device`); `cpu_weights` ("in_place", the default,
    "shared" or "packed": `rollout.cpu_weights`) is spo_ray's own, for vLLM's CPU engines.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        num_actors: int = 1,
        backend: str = "vllm",
        *,
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        colocate: bool = True,
        resources: dict[str, float] | None = None,
        node_labels: dict[str, str] | None = None,
        transport: str = "object_store",
        seed: int = 0,
        timeout_s: float = 300.0,
        start_timeout_s: float = 600.0,
        max_retries: int = 2,
        sampling_defaults: dict[str, Any] | None = None,
        **engine_options: Any,
    ):
        model_path = os.fspath(model_path)
        _check_arguments(model_path, num_actors, backend, transport, num_gpus_per_actor, timeout_s)
        if engine_options.get("cpu_weights", CPU_WEIGHTS[0]) not in CPU_WEIGHTS:
            raise UserError(
                f"rollout.cpu_weights: {engine_options['cpu_weights']!r} is not one of "
                + ", ".join(repr(mode) for mode in CPU_WEIGHTS)
            )
        if not ray.is_initialized():
            raise UserError(
                "RolloutPool needs a Ray runtime: call ray.init() (or run inside a Ray job) first"
            )
        if backend == "vllm" and transport != "object_store":
            engine_options.setdefault(
                "weight_transfer_config", {"backend": "nccl" if transport == "nccl" else "ipc"}
            )
        self.backend = backend
        self.transport_name = transport
        self.timeout_s = float(timeout_s)
        self.engine_options = dict(engine_options)
        # vLLM engines started with `enable_lora` take LoRA adapters in sync_weights(..., lora=...)
        self.lora_adapters = backend == "vllm" and bool(self.engine_options.get("enable_lora"))
        self.sampling_defaults = {"n": 1, "max_tokens": 64, "temperature": 1.0, "top_p": 1.0}
        self.sampling_defaults.update(sampling_defaults or {})
        SamplingSettings(**self.sampling_defaults)  # fail now on bad defaults
        # Longest a call can take: every retry waits out a timeout and then a replacement's start.
        self.bound_s = (max_retries + 1) * (self.timeout_s + start_timeout_s) + 60.0
        node_id = ray.get_runtime_context().get_node_id()
        self.colocate = colocate
        placement = Placement(
            num_cpus=num_cpus_per_actor,
            num_gpus=num_gpus_per_actor,
            resources=dict(resources or {}),
            node_labels=dict(node_labels or {}),
            preferred_node=node_id if colocate else None,
        )
        if not placement.fitting_nodes():  # would wait for start_timeout_s, then fail without a reason
            raise UserError(placement.no_node_text())
        spec = EngineSpec(
            backend=backend,
            model_path=os.path.abspath(model_path),
            seed=seed,
            engine_options=self.engine_options,
            placement=placement,
            colocate=colocate,
            timeout_s=self.timeout_s,
            start_timeout_s=start_timeout_s,
            max_retries=max_retries,
            env=process_env(),  # the console level of the process that builds the pool (spo_ray/logs.py)
        )
        self.manager = (
            ray.remote(RolloutManager)
            .options(
                num_cpus=0,
                max_concurrency=64,  # generate / sync / queries from several callers at once
                # hard: beside the process that built the pool (a soft choice may put it on a rollout
                # node, measured on a two-node cluster, and then losing that node loses the manager too)
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(spec, num_actors)
        )
        self._transport: WeightTransport | None = None
        try:
            _wait(self.manager.start.remote(), start_timeout_s + 60.0, "starting rollout engines")
        except BaseException:
            ray.kill(self.manager, no_restart=True)
            raise

    @classmethod
    def from_config(
        cls, model_path: str | os.PathLike, cfg: Any, lora_rank: int = 0, **engine_options: Any
    ) -> RolloutPool:
        """A pool built from a `RolloutConfig` (`cfg.rollout`); extra engine options pass through.

        `lora_rank` (`model.lora.r`): with `cfg.lora_sync` auto or adapter, vLLM engines start with LoRA
        support, and trainers sync the adapter rather than the merged model (`pool.lora_adapters`)."""
        if cfg.backend == "vllm" and cfg.num_gpus_per_actor > 0:
            engine_options.setdefault("gpu_memory_utilization", cfg.gpu_memory_utilization)
        if cfg.backend == "vllm":
            engine_options.setdefault("cpu_weights", cfg.cpu_weights)
        if lora_rank > 0 and cfg.backend == "vllm" and cfg.lora_sync != "merged":
            engine_options.setdefault("enable_lora", True)
            engine_options.setdefault(
                "max_lora_rank", min(r for r in VLLM_LORA_RANKS if r >= min(lora_rank, 512))
            )
            engine_options.setdefault("max_loras", 1)
        return cls(
            model_path,
            num_actors=cfg.num_actors,
            backend=cfg.backend,
            num_cpus_per_actor=cfg.num_cpus_per_actor,
            num_gpus_per_actor=cfg.num_gpus_per_actor,
            colocate=cfg.colocate,
            resources=cfg.resources,
            node_labels=cfg.node_labels,
            transport=cfg.transport,
            seed=cfg.seed,
            timeout_s=cfg.timeout_s,
            sampling_defaults={
                "n": cfg.samples_per_prompt,
                "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
            },
            **engine_options,
        )

    # -- sampling -------------------------------------------------------------------------------
    def generate_async(
        self,
        prompts: list[Prompt],
        n: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> PendingSamples:
        """Start sampling `n` responses per prompt; None means the pool's default for that setting.

        Each call draws fresh samples; pass `seed` to make one call reproducible on its own.
        """
        given = {"n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        settings = SamplingSettings(
            **{k: self.sampling_defaults[k] if v is None else v for k, v in given.items()}
        )
        checked = check_prompts(prompts)
        return PendingSamples(self.manager.generate.remote(checked, settings, seed), self.bound_s)

    def generate(self, prompts: list[Prompt], **settings: Any) -> list[list[Sample]]:
        """One list of `n` samples per prompt: `generate_async(prompts, **settings).result()`, same settings."""
        return self.generate_async(prompts, **settings).result()

    def prefer_this_node(self) -> int:
        """With `colocate`, move the engines to this process's node (the trainers' rank 0 calls it before
        its first sample); returns how many moved. Without `colocate`, or already there, nothing moves."""
        if not self.colocate:
            return 0
        node_id = ray.get_runtime_context().get_node_id()
        return _wait(self.manager.prefer_node.remote(node_id), self.bound_s, "moving rollout engines")

    # -- weights --------------------------------------------------------------------------------
    def sync_weights(
        self,
        state_dict: dict[str, torch.Tensor],
        version: int,
        lora: LoraAdapter | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Every engine serves `state_dict` (HF names, see `state_dict_for_sync`) before this returns.

        With `lora` (see `lora_sync_payload`; needs `pool.lora_adapters`), the engines serve that adapter on
        top of `state_dict` as their new base, or of the base they have when `state_dict` is empty; full
        weights without `lora` drop any adapter. Samples generated afterwards carry `policy_version ==
        version`. Returns what moved: `bytes` (the payload), `bytes_to_other_nodes` (copies Ray made in other
        nodes' object stores; object-store transport only, 0 otherwise), `engine_nodes`, `load_seconds`.

        `wait=False` (object-store transport) returns as soon as the payload is in the object store and every
        engine has its load queued: the caller may change its tensors at once and go on computing while the
        engines flip to the new weights between two generations. Any generation requested afterwards is made
        with them (or later ones). `wait_for_weights()` waits for the loads and raises what failed; a failure
        also surfaces at the next sync or generation. Returns `{"queued": True, "version": version}`.
        """
        if not isinstance(state_dict, dict) or not (state_dict or lora is not None):
            raise UserError("sync_weights needs a non-empty dict of tensors (see state_dict_for_sync)")
        if isinstance(version, bool) or not isinstance(version, int):
            raise UserError(f"sync_weights: version must be an integer, got {version!r}")
        if lora is not None and not self.lora_adapters:
            raise UserError(
                "sync_weights(lora=...): these rollout engines cannot serve LoRA adapters (backend "
                f"{self.backend!r}, enable_lora={self.engine_options.get('enable_lora', False)}); build the pool "
                "with RolloutPool.from_config(..., lora_rank=model.lora.r) on backend vllm, or sync merged weights"
            )
        if self._transport is None:
            self._transport = make_transport(self.transport_name, self.engine_options)
        try:
            if lora is not None:  # adapters travel through the object store whatever the transport
                return ObjectStoreTransport().sync_lora(
                    self.manager, state_dict, lora, version, self.bound_s, wait
                )
            return self._transport.sync(self.manager, state_dict, version, self.bound_s, wait)
        except GetTimeoutError:
            raise RolloutError(f"sync_weights: no answer within {self.bound_s:g} s") from None
        except RayTaskError as exc:
            raise_cause(exc)

    def wait_for_weights(self) -> dict[str, Any]:
        """Wait until every engine serves the weights of the last `sync_weights` (a no-op after a waiting one);
        raise the error a queued load met. Returns the report of the last completed load (`{}` before any)."""
        return _wait(self.manager.wait_loaded.remote(), self.bound_s, "waiting for queued weight loads")

    @property
    def policy_version(self) -> int:
        """The version of the last completed `sync_weights` (0 before any)."""
        return _wait(self.manager.get_policy_version.remote(), self.timeout_s, "policy_version")

    def engine_info(self) -> list[dict[str, Any]]:
        """Per engine actor: pid, node_id, policy_version, replaced (count)."""
        return _wait(self.manager.engine_info.remote(), self.timeout_s, "engine_info")

    # -- lifecycle ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every engine and the manager; the pool (and all its copies) cannot be used afterwards."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        with contextlib.suppress(RayError):
            ray.get(self.manager.shutdown.remote(), timeout=self.timeout_s)
        ray.kill(self.manager, no_restart=True)

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_transport"] = None  # GPU endpoints belong to the process that opened them
        return state


def _check_arguments(
    model_path: str, num_actors: int, backend: str, transport: str, num_gpus: float, timeout_s: float
) -> None:
    if backend not in BACKENDS:
        raise UserError(f"rollout backend {backend!r} is not one of {list(BACKENDS)}")
    if transport not in TRANSPORTS:
        raise UserError(f"rollout transport {transport!r} is not one of {list(TRANSPORTS)}")
    if transport != "object_store" and (backend != "vllm" or num_gpus <= 0):
        raise UserError(
            f"transport '{transport}' needs backend='vllm' on GPU actors (num_gpus_per_actor > 0)"
        )
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise UserError(f"num_actors must be a positive integer, got {num_actors!r}")
    if timeout_s <= 0:
        raise UserError(f"timeout_s must be positive, got {timeout_s!r}")
    check_model_path(model_path)


def check_model_path(model_path: str | os.PathLike) -> None:
    """Raise UserError unless `model_path` is a Hugging Face model folder (has config.json)."""
    if not os.path.isdir(model_path):
        raise UserError(f"model path '{model_path}' does not exist or is not a folder (cwd: {os.getcwd()})")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise UserError(
            f"model path '{model_path}' has no config.json: it must be a Hugging Face model folder"
        )
