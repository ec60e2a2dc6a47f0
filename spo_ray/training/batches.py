"""This rank's training batches: its shard of the epoch stream, from a resume position, collated."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from spo_ray.data import collate_preference_batch


def batch_stream(
    shard: Any,
    *,
    resume_at: tuple[int, int],
    batch_size: int,
    pad_token_id: int,
    packing: bool,
    rank: int,
    world: int,
) -> Iterator[tuple[Any, int, int]]:
    """(batch, epoch, consumed_in_epoch) from this rank's Ray Data shard, starting after `resume_at`.

    Rank r holds the epoch positions start+r, start+r+W, ... (see `train_shards`); rows before
    `resume_at` = (epoch, consumed_in_epoch), the checkpoint's position, were trained on already and are
    skipped, so a worker group restarted from a checkpoint continues with the next unseen example.
    `consumed_in_epoch` after a batch counts the whole world's rows, as the checkpoint stores it.
    """
    start_epoch, start_consumed = resume_at
    pending: dict[str, np.ndarray] | None = None
    for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        epochs, positions = rows["epoch"], rows["epoch_position"]
        unseen = (epochs > start_epoch) | ((epochs == start_epoch) & (positions >= start_consumed))
        rows = {key: value[unseen] for key, value in rows.items()}
        pending = rows if pending is None else {k: np.concatenate([pending[k], rows[k]]) for k in rows}
        while len(pending["example_id"]) >= batch_size:
            head = {k: v[:batch_size] for k, v in pending.items()}
            pending = {k: v[batch_size:] for k, v in pending.items()}
            consumed = int(head["epoch_position"][-1]) - rank + world  # global count after this batch
            yield (
                collate_preference_batch(head, pad_token_id, packing=packing),
                int(head["epoch"][-1]),
                consumed,
            )
    raise RuntimeError(
        "the training stream ran out of rows before train.max_steps (driver computes num_epochs)"
    )
