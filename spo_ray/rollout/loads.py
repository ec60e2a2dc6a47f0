"""The rollout manager's weight loads: every engine serves a synced version, waited for or queued.

A mixin of `RolloutManager` (manager.py), which owns the engine set these methods use (`slots`, `_call`,
`_wait`, `_settle`, `_replace`) and the state below. Kept apart so the manager reads as engines and
generation, and this file as the one place weights change.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from spo_ray.rollout.transports import copies_report
from spo_ray.rollout.types import raise_cause


class WeightLoads:
    """Loads of synced weights into the manager's engines (see `load_weights`)."""

    def _init_loads(self) -> None:
        self.latest: tuple[list[ray.ObjectRef], int] | None = None  # weight buckets a replacement must load
        self.latest_lora: tuple[dict[str, Any], int] | None = None  # and the LoRA adapter served on top
        self.policy_version = 0
        self.loading: list[threading.Thread] = []  # load_weights(wait=False) still waiting on engines
        self.load_error: BaseException | None = None  # the first error such a load met, not yet raised
        self.last_loaded: dict[str, Any] = {}  # the report of the last completed load
        self.loads_queued = self.loads_done = 0  # loads numbered in queuing order

    def load_weights(
        self,
        refs: list[ray.ObjectRef],
        version: int,
        source_node: str = "",
        lora: dict[str, Any] | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Every engine loads the weight buckets `refs` (a list, so Ray passes the refs, not the buckets)
        and serves them as `version`; what moved where.

        `source_node`: the node that put the buckets. The report counts their copies that Ray's object
        directory lists on other nodes: bytes that crossed between object stores for this sync.
        `lora`: a LoRA adapter (`{"refs", "config"}`) to serve on top; `refs` may then be empty (keep the base).
        Full weights without `lora` replace the base and drop any adapter.

        `wait=False` returns once every engine has the load queued, behind the call it is running: the
        buckets in the object store are the second buffer, and each engine flips to them between two of its
        calls, so every sample is still stamped with the weights that made it, and a generation requested
        after this returns is made with them. A thread waits out the loads (replacing engines that die or
        hang, as the blocking form does); `wait_loaded` waits for it and raises the first error a load met.
        """
        refs = list(refs)
        self._raise_load_error()
        with self.membership:  # the engines' queues get the load before any call submitted after this
            previous = self.latest, self.latest_lora
            if refs:
                self.latest = (refs, version)
            self.latest_lora = (lora, version) if lora is not None else None
            self.loads_queued += 1
            queued = (self.loads_queued, time.monotonic())  # order of queuing, and its time
            pending = {}
            for slot in list(self.slots):
                call, incarnation = self._call(slot, "load_weights", refs, version, lora)
                pending[call] = (slot, incarnation)
        moved = refs + (lora["refs"] if lora is not None else [])
        finish = (pending, previous, moved, lora, version, source_node, queued)
        if wait:
            return self._finish_load(*finish)
        thread = threading.Thread(target=self._finish_in_background, args=finish, daemon=True)
        thread.start()  # before it is listed: wait_loaded drops threads that are not alive
        with self.lock:
            self.loading.append(thread)
        return {"queued": True, "version": version}

    def wait_loaded(self) -> dict[str, Any]:
        """Wait for the loads `load_weights(wait=False)` queued; raise the first error one met (once). Returns the
        report of the last load that completed (`{}` before any)."""
        while True:
            with self.lock:
                threads = [t for t in self.loading if t.is_alive()]
                self.loading = threads
            if not threads:
                break
            for thread in threads:
                thread.join()
        self._raise_load_error()
        return dict(self.last_loaded)

    def _raise_load_error(self) -> None:
        with self.lock:
            error, self.load_error = self.load_error, None
        if error is not None:
            raise error

    def _finish_in_background(self, *finish: Any) -> None:
        try:
            self._finish_load(*finish)
        except BaseException as exc:  # handed to the next caller (wait_loaded, load_weights, generate)
            with self.lock:
                self.load_error = self.load_error or exc

    def _finish_load(
        self,
        pending: dict[ray.ObjectRef, tuple[Any, int]],  # call -> (the engine slot, its incarnation)
        previous: tuple[Any, Any],
        moved: list[ray.ObjectRef],
        lora: dict[str, Any] | None,
        version: int,
        source_node: str,
        queued: tuple[int, float],
    ) -> dict[str, Any]:
        """Wait for each engine's load of `version`, replacing engines that die or miss the deadline (the
        replacement loads `self.latest`). An engine that refuses the weights may hold part of them (vLLM's
        reload leaves its layers unusable): the previous latest weights are restored and the engine replaced
        by one that loads them, then the refusal is raised."""
        order, since = queued
        refused: list[RayTaskError] = []
        while pending:
            finished, overdue = self._wait({r: slot for r, (slot, _) in pending.items()})
            for done in finished:
                slot, inc = pending.pop(done)
                self._settle(slot, done)
                try:
                    ray.get(done)
                except RayTaskError as exc:
                    with self.membership:
                        if not refused and self.loads_queued == order:  # no later load replaced them
                            self.latest, self.latest_lora = previous
                        refused.append(exc)
                        self._replace(
                            slot, inc, f"engine {slot.index} refused the weights of version {version}"
                        )
                except RayError as exc:  # the replacement loads `self.latest`
                    self._replace(slot, inc, f"engine {slot.index} died while loading ({type(exc).__name__})")
            for late in overdue:
                slot, inc = pending.pop(late)
                self._settle(slot, late)
                self._replace(slot, inc, f"engine {slot.index} did not load weights within timeout_s")
        if refused:
            raise_cause(refused[0])
        report = copies_report(moved, {slot.node_id for slot in self.slots}, source_node)
        report.update(version=version, load_seconds=time.monotonic() - since)
        with self.lock:  # background loads may finish out of order: the last queued one is what engines serve
            if order > self.loads_done:
                self.loads_done = order
                self.policy_version = version
                self.last_loaded = report
        return report

    def record_synced(self, refs: list[ray.ObjectRef], version: int) -> None:
        """A GPU transport delivered `version`; `refs` are its CPU copy's buckets, for replacements."""
        with self.membership:
            self.latest, self.latest_lora = (list(refs), version), None
        self.policy_version = version
