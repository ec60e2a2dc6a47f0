"""The rollout manager actor: owns the engine actors, balances requests, replaces dead or hung ones.

Every RolloutPool copy (the driver's, a Ray Train worker's) talks to this one actor, so the engine
set, the latest weights (object-store refs) and the policy version have a single owner. Each call
to an engine has a deadline (`timeout_s`, counted from when the engine starts it); an engine that
dies or misses one is killed and replaced, and the replacement loads the latest weights before it
is given any work. A replacement goes where the placement allows (placement.py); when no live node can
hold one (the node with the rollout resources was lost), the call fails at once with a message that says so.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    OwnerDiedError,
    RayActorError,
    RayError,
    RayTaskError,
)

from spo_ray.rollout.engines import engine_class
from spo_ray.rollout.loads import WeightLoads
from spo_ray.rollout.placement import Placement
from spo_ray.rollout.types import (
    Prompt,
    RolloutError,
    Sample,
    SamplingSettings,
    derive_seed,
    raise_cause,
)

logger = logging.getLogger(__name__)


@dataclass
class EngineSpec:
    """Everything needed to start (or restart) one engine actor."""

    backend: str
    model_path: str
    seed: int
    engine_options: dict[str, Any]
    placement: Placement
    colocate: bool  # prefer the node of whoever calls `prefer_node` (the trainers' rank 0)
    timeout_s: float
    start_timeout_s: float
    max_retries: int
    env: dict[str, str] = field(default_factory=dict)  # the engine's environment, e.g. the console level


@dataclass
class _Slot:
    index: int
    handle: Any
    node_id: str = ""  # where the engine runs (known once it started)
    incarnation: int = 0
    inflight: int = 0  # prompts submitted and not yet answered (for balancing)
    # Calls submitted to this engine, in order. An engine runs one call at a time, so only the head
    # is running; its deadline counts from `head_since`, and queued calls wait without a clock.
    queue: list[ray.ObjectRef] = field(default_factory=list)
    head_since: float = 0.0


@dataclass
class _Chunk:
    start: int
    end: int
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


class RolloutManager(WeightLoads):
    """Runs as a threaded Ray actor (`num_cpus=0`); see the module docstring."""

    def __init__(self, spec: EngineSpec, num_actors: int):
        self.spec = spec
        self.num_actors = num_actors
        self.slots: list[_Slot] = []
        self._init_loads()  # the latest weights and the policy version (loads.py)
        self.calls = 0
        self.replacements = 0
        self.lock = threading.Lock()  # short critical sections: counters, slot choice
        self.membership = threading.RLock()  # held while the engine set or the latest weights change

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every engine; raise the first engine's error (e.g. a model it cannot serve)."""
        handles = [self._launch(i) for i in range(self.num_actors)]
        self.slots = [_Slot(i, handle) for i, handle in enumerate(handles)]
        try:
            ray.get([h.start.remote() for h in handles], timeout=self.spec.start_timeout_s)
            infos = ray.get([h.info.remote() for h in handles], timeout=self.spec.timeout_s)
            for slot, info in zip(self.slots, infos):
                slot.node_id = info["node_id"]
        except RayTaskError as exc:
            self.shutdown()
            raise_cause(exc)
        except (GetTimeoutError, RayError) as exc:
            self.shutdown()
            raise RolloutError(
                f"rollout engines did not start within {self.spec.start_timeout_s:g} s: {type(exc).__name__}: "
                f"{exc} (is there room for {self.num_actors} engine(s) with {self.spec.placement.describe()}?)"
            ) from None

    def _launch(self, index: int) -> Any:
        spec = self.spec
        cls = engine_class(spec.backend)
        options: dict[str, Any] = {
            **spec.placement.actor_options(),
            "max_restarts": 0,  # replacement is ours: it must reload the latest weights first
            "max_concurrency": 1,  # one call at a time, so version stamps are exact
        }
        env = dict(self.spec.env)
        if spec.backend == "vllm":
            from spo_ray.rollout.engines.vllm_engine import ACTOR_ENV

            env.update(ACTOR_ENV)
        options["runtime_env"] = {"env_vars": env}
        actor_cls = ray.remote(cls).options(**options)
        return actor_cls.remote(spec.model_path, spec.seed + index, spec.engine_options)

    def shutdown(self) -> None:
        """Kill every engine actor."""
        for slot in self.slots:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(slot.handle, no_restart=True)
        self.slots = []

    # -- queries --------------------------------------------------------------------------------
    def get_policy_version(self) -> int:
        return self.policy_version

    def engine_info(self) -> list[dict[str, Any]]:
        """Per engine: pid, node, loaded version, prompts served, and how often its slot was replaced.

        An engine answers between calls, so this waits for running generations.
        """
        infos = ray.get([s.handle.info.remote() for s in self.slots], timeout=self.spec.timeout_s)
        return [{**info, "replaced": s.incarnation} for s, info in zip(self.slots, infos)]

    def engine_handles(self) -> tuple[int, list[Any]]:
        """(replacement count, engine handles): a changed count means a GPU transport must re-connect."""
        with self.membership:
            return self.replacements, [s.handle for s in self.slots]

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self, prompts: list[Prompt], settings: SamplingSettings, seed: int | None
    ) -> list[list[Sample]]:
        """Split prompts over the engines, wait with deadlines, retry chunks on replaced engines."""
        if not prompts:
            return []
        self._raise_load_error()  # a queued load failed: say so rather than serve the old weights silently
        with self.lock:
            call_seed = seed if seed is not None else self.calls
            self.calls += 1
        seeds = [derive_seed(self.spec.seed, call_seed, i) for i in range(len(prompts))]
        num_chunks = min(len(prompts), len(self.slots))
        bounds = [round(i * len(prompts) / num_chunks) for i in range(num_chunks + 1)]
        chunks = [_Chunk(bounds[i], bounds[i + 1]) for i in range(num_chunks)]

        def submit(chunk_id: int) -> None:
            chunk = chunks[chunk_id]
            if chunk.attempts > self.spec.max_retries:
                raise RolloutError(
                    f"prompts {chunk.start}..{chunk.end - 1} failed on {chunk.attempts} engines: "
                    + "; ".join(chunk.errors)
                )
            chunk.attempts += 1
            with self.lock:
                slot = min(self.slots, key=lambda s: (s.inflight, s.index))
                slot.inflight += chunk.end - chunk.start
            part = slice(chunk.start, chunk.end)
            ref, incarnation = self._call(slot, "generate", prompts[part], settings, seeds[part])
            pending[ref] = (chunk_id, slot, incarnation)

        def settle(ref: ray.ObjectRef) -> tuple[int, _Slot, int]:
            chunk_id, slot, incarnation = pending.pop(ref)
            self._settle(slot, ref)
            with self.lock:
                slot.inflight -= chunks[chunk_id].end - chunks[chunk_id].start
            return chunk_id, slot, incarnation

        results: list[list[list[Sample]] | None] = [None] * num_chunks
        pending: dict[ray.ObjectRef, tuple[int, _Slot, int]] = {}
        try:
            for chunk_id in range(num_chunks):
                submit(chunk_id)
            while pending:
                finished, overdue = self._wait({ref: slot for ref, (_, slot, _) in pending.items()})
                for ref in finished:
                    chunk_id, slot, incarnation = settle(ref)
                    try:
                        results[chunk_id] = ray.get(ref)
                        continue
                    except RayTaskError as exc:
                        raise_cause(exc)  # the engine ran and refused: no retry
                    except RayError as exc:  # the engine process is gone
                        reason = f"engine {slot.index} died ({type(exc).__name__})"
                    chunks[chunk_id].errors.append(reason)
                    self._replace(slot, incarnation, reason)
                    submit(chunk_id)
                for ref in overdue:
                    chunk_id, slot, incarnation = settle(ref)
                    reason = f"engine {slot.index} gave no answer within timeout_s={self.spec.timeout_s:g}"
                    chunks[chunk_id].errors.append(reason)
                    self._replace(slot, incarnation, reason)
                    submit(chunk_id)
        finally:
            for ref in list(pending):
                settle(ref)
        return [samples for chunk_result in results for samples in chunk_result or []]

    # -- engine calls with deadlines --------------------------------------------------------------
    def _call(self, slot: _Slot, method: str, *args: Any) -> tuple[ray.ObjectRef, int]:
        """Submit `method` to the slot's engine, queued behind its earlier calls: (ref, incarnation)."""
        with self.lock:  # submission order == queue order == the engine's execution order
            ref = getattr(slot.handle, method).remote(*args)
            if not slot.queue:
                slot.head_since = time.monotonic()
            slot.queue.append(ref)
            return ref, slot.incarnation

    def _settle(self, slot: _Slot, ref: ray.ObjectRef) -> None:
        with self.lock:
            if ref in slot.queue:
                if slot.queue[0] == ref:
                    slot.head_since = time.monotonic()
                slot.queue.remove(ref)

    def _wait(self, calls: dict[ray.ObjectRef, _Slot]) -> tuple[list[ray.ObjectRef], list[ray.ObjectRef]]:
        """Block until one call finishes or a running call passes its deadline: (finished, overdue)."""
        now = time.monotonic()
        with self.lock:
            deadlines = {
                ref: slot.head_since + self.spec.timeout_s
                for ref, slot in calls.items()
                if slot.queue and slot.queue[0] == ref
            }
        wake = min([*deadlines.values(), now + self.spec.timeout_s])
        ready, _ = ray.wait(list(calls), num_returns=1, timeout=max(0.0, wake - now))
        if ready:
            return ready, []
        now = time.monotonic()
        return [], [ref for ref, deadline in deadlines.items() if deadline <= now]

    def _replace(self, slot: _Slot, incarnation: int, reason: str) -> None:
        """Kill the engine in `slot` and start a new one that loads the latest weights first."""
        with self.membership:
            if slot.incarnation != incarnation:
                return  # another thread replaced it already
            logger.warning("replacing rollout engine %d: %s", slot.index, reason)
            with contextlib.suppress(Exception):
                ray.kill(slot.handle, no_restart=True)
            handle, node_id = self._start_engine(slot.index, reason)
            self._swap(slot, handle, node_id)

    def _swap(self, slot: _Slot, handle: Any, node_id: str) -> None:
        with self.lock:
            slot.handle, slot.node_id, slot.queue = handle, node_id, []  # calls on the old engine fail alone
            slot.incarnation += 1
        self.replacements += 1

    def _start_engine(self, index: int, reason: str) -> tuple[Any, str]:
        """A started engine for slot `index` serving the latest weights, and its node; RolloutError when no
        live node can hold it (checked again while it starts, so a lost node fails fast, not at the timeout)."""
        placement = self.spec.placement
        deadline = time.monotonic() + self.spec.start_timeout_s
        for _ in range(3):  # an engine whose node dies while it starts is started again elsewhere
            if not placement.fitting_nodes():
                raise RolloutError(
                    f"rollout engine {index} cannot be replaced ({reason}): {placement.no_node_text()}"
                )
            handle = self._launch(index)
            try:
                started = handle.start.remote()
                while not ray.wait([started], timeout=min(5.0, max(0.0, deadline - time.monotonic())))[0]:
                    if time.monotonic() >= deadline:
                        raise GetTimeoutError(
                            f"no start within start_timeout_s={self.spec.start_timeout_s:g}"
                        )
                    if not placement.fitting_nodes():
                        raise RolloutError(
                            f"rollout engine {index} cannot be replaced ({reason}): {placement.no_node_text()}"
                        )
                ray.get(started)
                if self.latest is not None or self.latest_lora is not None:
                    refs, version = self.latest or ([], 0)
                    lora, version = self.latest_lora or (None, version)
                    ray.get(handle.load_weights.remote(refs, version, lora), timeout=self.spec.timeout_s)
                return handle, ray.get(handle.info.remote(), timeout=self.spec.timeout_s)["node_id"]
            except (ObjectLostError, OwnerDiedError):
                ray.kill(handle, no_restart=True)
                raise RolloutError(
                    f"rollout engine {index} died ({reason}) and its replacement cannot load the "
                    f"latest weights (version {self.latest[1] if self.latest else 0}): the process that "
                    "synced them has exited; call sync_weights again (e.g. after a trainer restart)"
                ) from None
            except RolloutError:
                ray.kill(handle, no_restart=True)
                raise
            except RayActorError:
                ray.kill(handle, no_restart=True)  # died while starting: try again where placement allows
            except Exception as exc:
                ray.kill(handle, no_restart=True)
                raise RolloutError(
                    f"could not replace rollout engine {index} ({reason}): {type(exc).__name__}: {exc}"
                ) from None
        raise RolloutError(
            f"rollout engine {index} died 3 times while starting ({reason}); {placement.describe()}"
        )

    # -- placement ------------------------------------------------------------------------------
    def prefer_node(self, node_id: str) -> int:
        """`colocate`: prefer `node_id` (the trainers' rank 0's) from now on; each engine running elsewhere is
        replaced by one started there while that node has room (then the old one stops). Returns how many moved."""
        if not self.spec.colocate or self.spec.placement.preferred_node == node_id:
            return 0
        self.spec.placement.preferred_node = node_id
        moved = 0
        for slot in list(self.slots):
            if slot.node_id == node_id:
                continue
            if not self.spec.placement.has_room_on(node_id):  # soft: the others stay where they are
                logger.info(
                    "rollout engines stay put: node %s has no room (%s)",
                    node_id,
                    self.spec.placement.describe(),
                )
                break
            with self.membership:
                handle, new_node = self._start_engine(
                    slot.index, f"moving next to the trainers on {node_id[:12]}"
                )
                if new_node != node_id:  # the node cannot hold it now (soft preference): keep the old one
                    ray.kill(handle, no_restart=True)
                    continue
                old = slot.handle
                self._swap(slot, handle, new_node)
                with contextlib.suppress(Exception):
                    ray.kill(old, no_restart=True)
                moved += 1
        return moved
