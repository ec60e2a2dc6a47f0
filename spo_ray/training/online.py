"""Online samples for the global KL regularizer: requested a step ahead, policy lag enforced, weights synced.

Versions: the rollout serves the weights synced after optimizer step v (version v; 0 = the start). At
step s a sample generated from version v lags by s − v steps. With `overlap` the samples for step s+1
are requested while step s computes, so lag is (sync_every − 1) + 1 at most. The bound
`rollout.max_policy_lag` holds on every rank: a batch that lags more is thrown away, and the sampler waits
until the engines serve a recent enough version (rank 0 syncs it; the other ranks may get there first)
before generating again, as often as needed (each retry counted in `stale_resamples`).

Syncs with `rollout.async_sync` (object store): rank 0 hands each sync to one thread that copies the weights
into the object store and queues their load on the engines while the next step computes; rank 0's sample
requests go through the same thread, so each queues behind the last sync, exactly as a waiting sync would
order them, and the lags above are unchanged. The optimizer waits for that copy (`settle`) before it changes
the weights.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np

from spo_ray.rollout.types import RolloutError


class OnlineSampler:
    """Draws regularization prompts per (rank, step) deterministically and fetches their samples."""

    def __init__(self, pool, prompts, rollout_cfg, *, rank: int, seed: int):
        """`prompts`: token-id prompts (a list of lists or a PromptSet), or an object ref to them."""
        import ray

        if isinstance(prompts, ray.ObjectRef):
            prompts = ray.get(prompts)  # a PromptSet: flat numpy arrays, read from the node's object store
        if prompts is None or not len(prompts):
            raise ValueError("the global KL regularizer needs prompts, and none were found")
        self.pool = pool
        self.prompts = prompts
        self.cfg = rollout_cfg
        self.rank = rank
        self.seed = seed
        self.pending: dict[int, object] = {}
        self.stale_resamples = 0
        self.last_sync: dict = {}  # the pool's report of the last completed sync (bytes, load_seconds, ...)
        self.base_synced = False  # adapter syncs: the engines serve this run's frozen LoRA base
        self._sender: ThreadPoolExecutor | None = None  # rank 0, rollout.async_sync: puts and queues syncs
        self._sending: Future | None = None  # the sync it is putting: settled before the weights change
        if rank == 0:  # rollout.colocate: the engines' preferred node is the trainers', not the driver's
            pool.prefer_this_node()

    def _prompts_for(self, step: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.rank, step])
        picks = rng.choice(
            len(self.prompts),
            size=self.cfg.prompts_per_step,
            replace=len(self.prompts) < self.cfg.prompts_per_step,
        )
        return [self.prompts[i] for i in picks]

    def request(self, step: int) -> None:
        """Start generating the samples that step `step` will use."""
        if step not in self.pending:
            request = partial(
                self.pool.generate_async,
                self._prompts_for(step),
                n=self.cfg.samples_per_prompt,
                max_tokens=self.cfg.max_tokens,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
            )
            # rank 0 with queued syncs: through their thread, so the request queues behind the last sync
            self.pending[step] = self._sender.submit(request) if self._sender is not None else request()

    def _fetch(self, step: int) -> tuple[list, int]:
        """Wait for step's samples (requesting them if needed): (flat samples, policy lag)."""
        self.request(step)
        pending = self.pending.pop(step)
        if isinstance(pending, Future):  # the request went through the sync thread
            pending = pending.result()
        samples = [s for group in pending.result(timeout=self.cfg.timeout_s) for s in group]
        return samples, step - min(s.policy_version for s in samples)

    def get(self, step: int) -> tuple[list, float, int]:
        """(flat samples, seconds waited, policy lag) for `step`, with lag ≤ rollout.max_policy_lag."""
        start = time.perf_counter()
        samples, lag = self._fetch(step)
        while lag > self.cfg.max_policy_lag:
            self.stale_resamples += 1
            self._wait_for_version(step - self.cfg.max_policy_lag, step, deadline=start + self.cfg.timeout_s)
            samples, lag = self._fetch(step)
        if self.cfg.overlap:
            self.request(step + 1)
        return samples, time.perf_counter() - start, lag

    def _wait_for_version(self, version: int, step: int, deadline: float) -> None:
        """Block until the rollout engines serve weights of `version` or later; RolloutError at `deadline`."""
        while True:
            served = self.pool.policy_version
            if time.perf_counter() > deadline:
                raise RolloutError(
                    f"rank {self.rank}, step {step}: the rollout engines serve version {served} after "
                    f"{self.cfg.timeout_s:g} s, and rollout.max_policy_lag={self.cfg.max_policy_lag} needs "
                    f"samples of version {version} or later: rank 0 syncs every rollout.sync_every="
                    f"{self.cfg.sync_every} steps"
                )
            if served >= version:
                return
            time.sleep(0.02)

    def sync(self, model, version: int, wait: bool | None = None) -> float:
        """Push the policy to every rollout actor: the LoRA-merged weights, or with engines that serve
        adapters (`pool.lora_adapters`, rollout.lora_sync) the LoRA adapter alone, its frozen base with the
        first sync of this sampler. Returns the seconds the caller was held.

        Every rank calls it: the full weights are gathered from every rank's FSDP shard (a collective), and
        rank 0 sends them. With rollout.async_sync (unless `wait`), rank 0 first waits for the previous sync
        (one in flight at most: the served weights and the queued ones), then hands this one to a thread that
        copies it into the object store and queues it while the next step computes (`settle()` before the
        optimizer changes the weights); `last_sync` reports the last sync that completed."""
        from spo_ray.models.sharding import unwrap_model
        from spo_ray.rollout.weights import lora_sync_payload, state_dict_for_sync

        start = time.perf_counter()
        wait = not self.cfg.async_sync if wait is None else wait
        if getattr(self.pool, "lora_adapters", False) and hasattr(unwrap_model(model), "peft_config"):
            base, adapter = lora_sync_payload(model, with_base=not self.base_synced)
            if self.rank == 0:
                self._send(base, version, adapter, wait)
            self.base_synced = True
        else:
            weights = state_dict_for_sync(model)  # rank 0: the full weights; other ranks: {}
            if self.rank == 0:
                # a GPU transport's broadcast reads the trainer's tensors: it always waits
                self._send(weights, version, None, wait or self.cfg.transport != "object_store")
        return time.perf_counter() - start

    def _send(self, weights, version: int, adapter, wait: bool) -> None:
        self.settle()
        # one sync in flight: wait for the last one (it had this whole step, so as a rule it is done)
        previous = self.pool.wait_for_weights()
        if wait:
            self.last_sync = self.pool.sync_weights(weights, version, lora=adapter) or {}
            return
        self.last_sync = previous
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spo-ray-weight-sync")
        # the copy into the object store and the queuing run beside the next step's forward and backward
        self._sending = self._sender.submit(self.pool.sync_weights, weights, version, adapter, False)

    def settle(self) -> None:
        """Rank 0: wait until the last queued sync has copied the weights out (call before they change, i.e.
        before `optimizer.step()`); raise what it met."""
        if self._sending is not None:
            sending, self._sending = self._sending, None
            sending.result()

    def finish(self) -> None:
        """Rank 0: wait until the engines serve the last synced weights (a queued load's error is raised)."""
        if self.rank == 0:
            self.settle()
            self.last_sync = self.pool.wait_for_weights()
        if self._sender is not None:
            self._sender.shutdown()  # its thread ends; a later request or sync goes straight to the pool
            self._sender = None
