"""Per-rank shards of each epoch's order (`spo_ray.data.permutation`) as Ray Data streams (README.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from spo_ray.data.permutation import derive_key, inverse_permute

if TYPE_CHECKING:
    import ray.data
    import ray.train

    from spo_ray.data.prepared import PreparedData
    from spo_ray.data.store import RowIndex


@dataclass(frozen=True)
class ShardPlan:
    """How one epoch's stream from `start` is divided: `per_rank` rows each, `dropped` left over."""

    num_examples: int
    world_size: int
    start: int
    per_rank: int
    dropped: int

    @property
    def end(self) -> int:
        """First epoch position not read (start + per_rank * world_size)."""
        return self.start + self.per_rank * self.world_size


def shard_plan(num_examples: int, world_size: int, start: int = 0) -> ShardPlan:
    """Per-rank row count and the dropped remainder for reading an epoch from position `start`."""
    if world_size < 1:
        raise ValueError(f"train_shards: world_size must be at least 1, got {world_size}")
    if not 0 <= start <= num_examples:
        raise ValueError(
            f"train_shards: start={start} is outside this epoch's 0..{num_examples} examples; "
            f"pass start = examples consumed in the current epoch and move to the next epoch at the end"
        )
    per_rank = (num_examples - start) // world_size
    return ShardPlan(num_examples, world_size, start, per_rank, num_examples - start - per_rank * world_size)


ROWS_PER_READ = 1024  # positions one read task takes from the part files


def _read_positions(batch: dict[str, np.ndarray], index: RowIndex, n: int, w: int, rank: int) -> Any:
    """One read task: this rank's positions first..first+count-1 (k-th = start + rank + k*w) of one epoch,
    mapped back to example ids with the inverse permutation and taken from the parts in position order."""
    import pyarrow as pa

    tables = []
    for epoch, key, start, first, count, offset in zip(
        batch["epoch"], batch["key"], batch["start"], batch["first"], batch["count"], batch["offset"]
    ):
        position = int(start) + rank + w * (int(first) + np.arange(int(count), dtype=np.int64))
        table = index.read(inverse_permute(position, n, int(key)))
        table = table.append_column("epoch", pa.array(np.full(len(position), int(epoch), dtype=np.int64)))
        table = table.append_column("epoch_position", pa.array(position))
        tables.append(table.append_column("stream_position", pa.array(position + int(offset))))
    return pa.concat_tables(tables)


def train_shards(
    prepared: PreparedData,
    world_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    num_epochs: int = 1,
    rows_per_read: int = ROWS_PER_READ,
) -> dict[str, ray.data.Dataset]:
    """One dataset per rank, "train_rank{r}": positions start+r, start+r+W, ... of epoch `epoch`, in order.

    num_epochs > 1 continues into the next epochs from 0. Rows carry epoch, epoch_position and
    stream_position. Each rank reads only its own rows: its positions are mapped to example ids with
    the inverse permutation and taken from the memory-mapped parts, `rows_per_read` per task, streamed
    (no sort, nothing read before the first batch but that batch's rows). Hand them to Ray Train with
    `shard_data_config()`, which keeps the order."""
    import ray.data

    if num_epochs < 1:
        raise ValueError(f"train_shards: num_epochs must be at least 1, got {num_epochs}")
    n = prepared.num_train
    plans = [shard_plan(n, world_size, start)] + [shard_plan(n, world_size, 0)] * (num_epochs - 1)
    tasks = []
    for i, plan in enumerate(plans):
        key = derive_key(seed, "epoch", epoch + i)
        for first in range(0, plan.per_rank, rows_per_read):
            count = min(rows_per_read, plan.per_rank - first)
            tasks.append(
                {
                    "epoch": epoch + i,
                    "key": str(key),  # a uint64 key does not fit an int64 column
                    "start": plan.start,
                    "first": first,
                    "count": count,
                    "offset": i * n,
                }
            )
    shards = {}
    for rank in range(world_size):
        ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
        ds = ds.map_batches(
            _read_positions,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"index": prepared.train_rows, "n": n, "w": world_size, "rank": rank},
        )
        ds.context.execution_options.preserve_order = True
        shards[f"train_rank{rank}"] = ds
    return shards


def shard_data_config() -> ray.train.DataConfig:
    """Ray Train's dataset config for `train_shards`: no further split, and the order kept (the rank's
    read tasks run in parallel; their blocks are handed out in stream order)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)
