"""Deterministic epoch order and per-rank shards from a keyed permutation of example ids (README.md)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ray.data

    from spo_ray.data.pipeline import PreparedData

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def derive_key(seed: int, *purpose: Any) -> int:
    """A 64-bit key from a seed and a purpose (e.g. ('epoch', 3)); stable across runs and platforms."""
    text = ":".join(map(str, (seed, *purpose))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(values: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n) applied elementwise: balanced Feistel network plus cycle walking."""
    values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() >= n):
        raise ValueError(f"permute: values must lie in [0, {n})")
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # domain 4**half >= n
    mask = np.uint64((1 << half) - 1)
    round_keys = [np.uint64(derive_key(key, "round", r)) for r in range(_ROUNDS)]
    out = values.astype(np.uint64)
    todo = np.ones(out.shape, dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            x = out[todo]
            left, right = x >> np.uint64(half), x & mask
            for round_key in round_keys:
                left, right = right, left ^ (_mix(right ^ round_key) & mask)
            out[todo] = (left << np.uint64(half)) | right
            todo = out >= np.uint64(n)
    return out.astype(np.int64)


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


ROWS_PER_SORTED_BLOCK = 8192


def _select_rank(
    batch: Any,
    n: int,
    epochs: list[int],
    keys: list[int],
    starts: list[int],
    ends: list[int],
    w: int,
    rank: int,
) -> Any:
    """This rank's rows of each epoch, tagged with epoch, epoch_position and stream_position (pyarrow)."""
    import pyarrow as pa

    ids = batch.column("example_id").to_numpy()
    parts = []
    for index, (epoch, key, start, end) in enumerate(zip(epochs, keys, starts, ends)):
        position = permute(ids, n, key)
        keep = (position >= start) & (position < end) & ((position - start) % w == rank)
        part = batch.filter(pa.array(keep))
        part = part.append_column("epoch", pa.array(np.full(len(part), epoch, dtype=np.int64)))
        part = part.append_column("epoch_position", pa.array(position[keep]))
        part = part.append_column("stream_position", pa.array(position[keep] + index * n))
        parts.append(part)
    return pa.concat_tables(parts)


def train_shards(
    prepared: PreparedData, world_size: int, seed: int, epoch: int, start: int = 0, num_epochs: int = 1
) -> dict[str, ray.data.Dataset]:
    """One dataset per rank, "train_rank{r}": positions start+r, start+r+W, ... of epoch `epoch`, in order.

    num_epochs > 1 continues into the next epochs from 0. Rows carry epoch, epoch_position and
    stream_position (the sort key; the sort is last, so Ray Train's ingest options keep the order)."""
    if num_epochs < 1:
        raise ValueError(f"train_shards: num_epochs must be at least 1, got {num_epochs}")
    n = prepared.num_train
    plans = [shard_plan(n, world_size, start)] + [shard_plan(n, world_size, 0)] * (num_epochs - 1)
    fn_kwargs = {
        "n": n,
        "epochs": [epoch + i for i in range(num_epochs)],
        "keys": [derive_key(seed, "epoch", epoch + i) for i in range(num_epochs)],
        "starts": [p.start for p in plans],
        "ends": [p.end for p in plans],
        "w": world_size,
    }
    # Sort partitions given up front (no sampling pass): equal ranges of the stream's positions.
    rows_per_rank = sum(p.per_rank for p in plans)
    parts = max(1, -(-rows_per_rank // ROWS_PER_SORTED_BLOCK))
    low, high = start, (num_epochs - 1) * n + plans[-1].end
    boundaries = sorted({low + (high - low) * i // parts for i in range(1, parts)})
    shards = {}
    for rank in range(world_size):
        selected = prepared.train.map_batches(
            _select_rank, batch_format="pyarrow", fn_kwargs={**fn_kwargs, "rank": rank}
        )
        shard = selected.sort("stream_position", boundaries=boundaries or None)
        shard.context.execution_options.preserve_order = True
        shards[f"train_rank{rank}"] = shard
    return shards
