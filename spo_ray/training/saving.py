"""The worker side of a checkpoint: check the disk, save every rank's files, report them to Ray Train, prune."""

from __future__ import annotations

import tempfile

import ray.train

from spo_ray.training.checkpointing import (
    CheckpointStore,
    TrainState,
    checkpoint_bytes,
    save_checkpoint,
    space_shortfall,
)
from spo_ray.training.worker import Worker


def checkpoint_due(step: int, max_steps: int, every: int) -> bool:
    """Save after this optimizer step: every `every` steps (0: never in between) and at the last."""
    return step == max_steps or (every > 0 and step % every == 0)


def save_or_stop(
    worker: Worker,
    store: CheckpointStore,
    model,
    optimizer,
    scheduler,
    state: TrainState,
    metrics,
    writers,
    keep,
    degree=None,
) -> str | None:
    """Save this step's checkpoint on every rank; or, when the disk is full on any rank, save nothing and
    return why (every rank stops at this same step). `writers`: this rank's line writers (metrics, trace); `degree`: loss.sspo_lambda's head, or None."""
    shortfall = _disk_shortfall(worker, store, model, optimizer, writers)
    if worker.any(shortfall is not None):
        return shortfall or "another rank could not write its files"
    for writer in writers:  # a remote output dir gets the lines up to this checkpoint
        writer.sync()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(
            tmp,
            rank=worker.rank,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
            degree=degree,
        )
        ray.train.report({"step": state.step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if worker.is_chief:  # the folder just reported is the newest; older and torn ones go
        store.prune(keep)
    return None


def _disk_shortfall(worker: Worker, store: CheckpointStore, model, optimizer, writers) -> str | None:
    """What says the disk is full before this checkpoint: a failed metrics/trace write, or too little room."""
    failed = next((w.write_error for w in writers if w.write_error), None)
    if failed or not worker.is_chief:
        return failed
    return space_shortfall(store.root, checkpoint_bytes(model, optimizer))
