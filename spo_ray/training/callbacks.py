"""Driver-side callbacks of a training run: on each step, on each evaluation, on each checkpoint.

The steps run in Ray Train workers, so the callbacks run in the caller's process instead, from what the
run writes: a watcher thread reads `metrics.jsonl` and the checkpoint store while `trainer.fit()` blocks,
and a last read after it returns delivers whatever is left. So every step, evaluation and checkpoint of
this run reaches the callbacks once and in order, in the caller's process, where they can touch its objects.
With a remote `output.dir` the metrics file is uploaded at each checkpoint, so callbacks arrive in bursts.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Sequence
from typing import Any

from spo_ray import storage
from spo_ray.training.checkpointing import CheckpointStore
from spo_ray.training.metrics import EVAL_PREFIX, read_metrics


class Callback:
    """Subclass and override what you need; every method runs in the process that called `spo_ray.train`.

    `on_step(step, metrics)`: after each optimizer step, with the step's metrics (as in `metrics.jsonl`).
    `on_eval(step, metrics)`: after each evaluation, with its `eval/...` metrics.
    `on_checkpoint(step, path)`: after each complete checkpoint, with its folder (a local path or a URI).
    `round`: in `spo_ray.iterate`, the round whose training is running (1, 2, ...; each round's steps count
    from 1 again and its checkpoints are in its own folder); 0 in `spo_ray.train`.
    """

    round: int = 0

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, step: int, path: str) -> None:
        pass


class CallbackError(RuntimeError):
    """A user callback raised; the run itself finished (or stopped) on its own terms."""


class RunWatcher:
    """Feeds a run's metrics lines and new checkpoints to callbacks (see the module docstring)."""

    def __init__(
        self,
        output_dir: storage.AnyPath,
        store: CheckpointStore,
        callbacks: Sequence[Callback],
        after_step: int,
        interval_s: float = 1.0,
    ):
        self.output_dir = output_dir
        self.store = CheckpointStore(store.root, hashes=False)  # sizes only: polled every interval
        self.callbacks = list(callbacks)
        self.last_step = self.last_eval_step = self.last_checkpoint_step = after_step
        self.interval_s = interval_s
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunWatcher:
        if self.callbacks:
            self._thread = threading.Thread(target=self._watch, name="spo-ray-callbacks", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.poll()  # what the run wrote after the thread's last look

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise CallbackError(f"a callback raised {self.error!r} (traceback above)") from self.error

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Deliver the metrics lines and checkpoints that appeared since the last call."""
        if not self.callbacks or self.error is not None:
            return
        try:
            rows = read_metrics(self.output_dir)
        except FileNotFoundError:
            rows = []
        for row in rows:  # a restarted worker group rewrites steps after its checkpoint: each is sent once
            step = int(row.get("step", 0))
            if step > self.last_step and any(not k.startswith(EVAL_PREFIX) for k in row if k != "step"):
                self.last_step = step
                self._call("on_step", step, row)
            evals = {k: v for k, v in row.items() if k.startswith(EVAL_PREFIX)}
            if evals and step > self.last_eval_step:  # after the step's own metrics, as TRL orders them
                self.last_eval_step = step
                self._call("on_eval", step, evals)
        try:
            checkpoints = self.store.complete()  # (step, folder), oldest first
        except FileNotFoundError:  # a folder pruned while it was read: the next poll sees the rest
            return
        for step, folder in checkpoints:
            if step > self.last_checkpoint_step:
                self.last_checkpoint_step = step
                self._call("on_checkpoint", step, str(folder))

    def _call(self, method: str, step: int, payload: Any) -> None:
        if self.error is not None:
            return
        for callback in self.callbacks:
            try:
                getattr(callback, method)(step, payload)
            except Exception as exc:  # the run goes on; the caller gets CallbackError once it ends
                traceback.print_exc()
                print(
                    f"spo-ray: callback {type(callback).__name__}.{method} raised at step {step}; no further "
                    "callbacks run and spo_ray.train raises CallbackError when the run ends",
                    flush=True,
                )
                self.error = exc
                return
