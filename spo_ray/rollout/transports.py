"""Weight-sync transports: how a trainer's state dict reaches every rollout engine.

The pool owns one transport, chosen by `RolloutConfig.transport`; callers only ever call
`pool.sync_weights(state_dict, version)`. Who owns what:

- the caller (trainer rank 0) owns the state dict and, for GPU transports, the sending endpoint;
- the rollout manager owns the engine set and the latest weights as an object-store ref, which
  every replacement engine loads before it serves (GPU transports also put a CPU copy there);
- each engine owns its loaded weights and stamps samples with their version.
"""

from __future__ import annotations

import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import ray
import torch
from ray.experimental import get_object_locations

from spo_ray.rollout.serialization import state_dict_to_buckets
from spo_ray.rollout.types import RolloutError


class WeightTransport(ABC):
    """Moves one state dict into every engine of a rollout manager, then records its version."""

    @abstractmethod
    def sync(
        self,
        manager: Any,
        state_dict: dict[str, torch.Tensor],
        version: int,
        timeout_s: float,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Return once every engine serves `state_dict` as `version`: a report of what moved where
        (`bytes`, `bytes_to_other_nodes`, `engine_nodes`; see RolloutManager.load_weights). With `wait=False`
        a transport may return once the engines have the load queued (`{"queued": True, ...}`) and the state
        dict may change; a GPU transport sends it first. A LoRA adapter (with or without its base) always
        goes through the object store: `ObjectStoreTransport.sync_lora`."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release transport resources (process groups); the default has none."""


def put_weights(state_dict: dict[str, torch.Tensor]) -> list[ray.ObjectRef]:
    """One `ray.put` per bucket of tensors (serialization.py): the tensors' bytes are copied once, into shared
    memory, and every engine on a node maps that memory rather than copying it again."""
    return [ray.put(bucket) for bucket in state_dict_to_buckets(state_dict)]


def copies_report(refs: list[ray.ObjectRef], engine_nodes: set[str], source_node: str) -> dict[str, Any]:
    """What one object-store sync moved: payload `bytes` (all buckets), and `bytes_to_other_nodes`, each
    bucket's size times the nodes other than `source_node` that Ray's object directory lists a copy on (each
    copy crossed between object stores). A pull is listed shortly after it completes, so wait briefly."""
    deadline = time.monotonic() + 2.0
    while True:
        locations = get_object_locations(refs, timeout_ms=5000)
        copies = [set(locations.get(ref, {}).get("node_ids") or []) for ref in refs]
        # no copy listed: the bucket was inlined (<100 KB) into the call
        if all(not c or engine_nodes <= c for c in copies) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    sizes = [int(locations.get(ref, {}).get("object_size") or 0) for ref in refs]
    return {
        "bytes": sum(sizes),
        "buckets": len(refs),
        "engine_nodes": sorted(engine_nodes),
        "copies_on_nodes": sorted(set().union(*copies)),
        "bytes_to_other_nodes": sum(size * len(c - {source_node}) for size, c in zip(sizes, copies))
        if source_node
        else 0,
    }


class ObjectStoreTransport(WeightTransport):
    """Buckets of tensors through the Ray object store: works everywhere, CPU included."""

    def sync(
        self,
        manager: Any,
        state_dict: dict[str, torch.Tensor],
        version: int,
        timeout_s: float,
        wait: bool = True,
    ) -> dict[str, Any]:
        refs = put_weights(state_dict)  # the only copy: afterwards the caller may change its tensors
        here = ray.get_runtime_context().get_node_id()
        return ray.get(manager.load_weights.remote(refs, version, here, None, wait), timeout=timeout_s)

    def sync_lora(
        self,
        manager: Any,
        base: dict[str, torch.Tensor],
        adapter: Any,
        version: int,
        timeout_s: float,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Every engine serves `adapter` (a LoraAdapter) as `version`, on top of `base` when given (else on the
        base it has): one atomic load per engine, so no sample is stamped `version` without the adapter."""
        refs = put_weights(base) if base else []
        lora = {"refs": put_weights(adapter.tensors), "config": adapter.config}
        here = ray.get_runtime_context().get_node_id()
        return ray.get(manager.load_weights.remote(refs, version, here, lora, wait), timeout=timeout_s)


class VllmTransferTransport(WeightTransport):
    """vLLM's weight-transfer engines (`nccl` broadcast or CUDA `ipc`), for the GPU build.

    Uses `WeightTransferTrainerFactory.trainer_init` with a client over our engine actors. A
    replaced engine is not in the old NCCL group, so a changed engine set re-connects first.
    """

    def __init__(self, backend: str, ranks_per_engine: int = 1):
        if backend not in ("nccl", "ipc"):
            raise ValueError(f"unknown vLLM weight-transfer backend {backend!r}")
        self.backend = backend
        self.ranks_per_engine = ranks_per_engine
        self.engine: Any = None  # vLLM TrainerWeightTransferEngine, lives in this process only
        self.replacements = -1
        self.source: Any = None  # vLLM WeightSource, built on first connect
        self.client: _EngineClient | None = None

    def sync(
        self,
        manager: Any,
        state_dict: dict[str, torch.Tensor],
        version: int,
        timeout_s: float,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Always waits: the broadcast reads the trainer's tensors, so it must end before they change."""
        if not torch.cuda.is_available():
            raise RolloutError(f"transport '{self.backend}' needs a CUDA device in the process that syncs")
        replacements, handles = ray.get(manager.engine_handles.remote(), timeout=timeout_s)
        if self.engine is None or replacements != self.replacements:
            self._connect(handles, timeout_s)
            self.replacements = replacements
        assert self.client is not None
        self.source.state_dict = state_dict
        self.client.version = version
        _run_with_timeout(self.engine.send_weights, timeout_s, f"{self.backend} weight transfer")
        # A CPU copy in the object store, so a replacement engine can load these weights on its own.
        cpu_copy = put_weights({name: t.detach().to("cpu") for name, t in state_dict.items()})
        ray.get(manager.record_synced.remote(cpu_copy, version), timeout=timeout_s)
        size = sum(t.numel() * t.element_size() for t in state_dict.values())
        return {"bytes": size, "bytes_to_other_nodes": 0, "engine_nodes": []}  # moved by NCCL / IPC, not Ray

    def _connect(self, handles: list[Any], timeout_s: float) -> None:
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        self.close()
        if self.source is None:
            self.source = _dict_source()
        self.client = _EngineClient(handles, timeout_s, self.ranks_per_engine)
        if self.backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            init_info: Any = NCCLTrainerInitInfo(
                master_address=ray.util.get_node_ip_address(),
                master_port=_free_port(),
                world_size=1 + len(handles) * self.ranks_per_engine,
                rank=0,
            )
        else:
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            init_info = IPCTrainerInitInfo(rank=0)
        self.engine = _run_with_timeout(
            lambda: WeightTransferTrainerFactory.trainer_init(
                init_info, client=self.client, source=self.source
            ),
            timeout_s,
            f"{self.backend} weight-transfer rendezvous",
        )

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


class _EngineClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our engine actors, with deadlines.

    Independent engines each think they are data-parallel rank 0, so NCCL ranks are offset per engine.
    """

    def __init__(self, handles: list[Any], timeout_s: float, ranks_per_engine: int):
        self.handles = handles
        self.timeout_s = timeout_s
        self.ranks_per_engine = ranks_per_engine
        self.version = 0

    def _all(self, refs: list[ray.ObjectRef]) -> None:
        ray.get(refs, timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        infos = []
        for i, _ in enumerate(self.handles):
            info = dict(init_info)
            if "rank_offset" in info:
                info["rank_offset"] = init_info["rank_offset"] + i * self.ranks_per_engine
            infos.append(info)
        self._all([h.init_weight_transfer_engine.remote(info) for h, info in zip(self.handles, infos)])

    def start_weight_update(self) -> None:
        self._all([h.start_weight_update.remote() for h in self.handles])

    def update_weights(self, update_info: Any) -> None:
        self._all([h.update_weights.remote(update_info) for h in self.handles])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all([h.finish_weight_update.remote(self.version) for h in self.handles])


def _dict_source() -> Any:
    """A vLLM `WeightSource` whose `state_dict` is replaced before each sync."""
    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    class DictSource(WeightSource):
        def __init__(self) -> None:
            self.state_dict: dict[str, torch.Tensor] = {}

        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.state_dict.items()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in self.state_dict.items():
                yield name, tensor.detach().to("cuda", non_blocking=True).contiguous()

    return DictSource()


def _run_with_timeout(fn: Any, timeout_s: float, what: str) -> Any:
    """Run `fn` in a daemon thread; raise RolloutError if it does not finish in time (NCCL can hang)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=what)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RolloutError(f"{what} did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def make_transport(name: str, engine_options: dict[str, Any]) -> WeightTransport:
    """The transport for a `RolloutConfig.transport` name."""
    if name == "object_store":
        return ObjectStoreTransport()
    ranks = int(engine_options.get("tensor_parallel_size", 1)) * int(
        engine_options.get("pipeline_parallel_size", 1)
    )
    return VllmTransferTransport("nccl" if name == "nccl" else "ipc", ranks_per_engine=ranks)
