"""Epoch order, per-rank shards and resume: exactly once per epoch, no repeats or skips after a restart."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from spo_ray.config import DataConfig
from spo_ray.data import permute, prepare_preference_data, shard_plan, train_shards
from spo_ray.data.permutation import derive_key, inverse_permute
from spo_ray.data.sharding import shard_data_config

N = 23  # odd: with 2 ranks one example per epoch is left over
WORLD = 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir, ray_runtime):
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    tmp = tmp_path_factory.mktemp("sharding")
    rows = [{"prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(N)]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare_preference_data(
        DataConfig(train_files=[str(tmp / "pairs.jsonl")]), str(tiny_model_dir), str(tmp)
    )


def read(shard, limit: int | None = None, batch_size: int = 4) -> list[tuple[int, int, int]]:
    """(epoch, epoch_position, example_id) of a shard's rows in stream order, as a trainer reads them."""
    out = []
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        out += list(
            zip(batch["epoch"].tolist(), batch["epoch_position"].tolist(), batch["example_id"].tolist())
        )
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def test_permute_is_a_seeded_bijection_for_any_size():
    for n in (1, 2, 5, 64, 1000, 1025):
        values = np.arange(n)
        assert sorted(permute(values, n, key=7).tolist()) == list(range(n))
        assert inverse_permute(permute(values, n, key=2**63 + 7), n, key=2**63 + 7).tolist() == list(range(n))
    assert permute(np.arange(1000), 1000, 1).tolist() != permute(np.arange(1000), 1000, 2).tolist()


def test_two_ranks_see_every_example_once_per_epoch_in_strided_order(prepared):
    shards = train_shards(prepared, world_size=WORLD, seed=0, epoch=0, start=0)
    assert sorted(shards) == ["train_rank0", "train_rank1"]
    streams = [read(shards[f"train_rank{r}"]) for r in range(WORLD)]
    plan = shard_plan(N, WORLD)
    assert (plan.per_rank, plan.dropped) == (11, 1)
    for rank, stream in enumerate(streams):
        assert [pos for _, pos, _ in stream] == list(range(rank, 22, WORLD))
    seen = [ex for stream in streams for _, _, ex in stream]
    assert len(seen) == len(set(seen)) == N - 1
    ids = [ex for _, _, ex in streams[0]]
    assert ids != sorted(ids)  # shuffled, not file order
    positions = permute(np.array(ids), N, derive_key(0, "epoch", 0))
    assert positions.tolist() == [pos for _, pos, _ in streams[0]]


def test_shuffle_is_deterministic_by_seed_and_differs_across_seeds_and_epochs(prepared):
    def order(seed: int, epoch: int) -> list[int]:
        return [ex for _, _, ex in read(train_shards(prepared, 1, seed=seed, epoch=epoch)["train_rank0"])]

    first = order(seed=0, epoch=0)
    assert sorted(first) == list(range(N))
    assert order(seed=0, epoch=0) == first
    assert order(seed=1, epoch=0) != first
    assert order(seed=0, epoch=1) != first


def test_resuming_at_epoch_and_position_continues_without_repeats_or_skips(prepared):
    # rows_per_read=2: each rank's stream comes from many read tasks running in parallel
    uninterrupted = train_shards(prepared, WORLD, seed=3, epoch=0, start=0, num_epochs=2, rows_per_read=2)
    full = [read(uninterrupted[f"train_rank{r}"]) for r in range(WORLD)]
    assert [len(s) for s in full] == [22, 22]  # two epochs of 11 rows per rank
    # Interrupted mid-epoch 0 after 3 batches of 2 rows per rank (12 examples consumed globally) ...
    before = [
        read(
            train_shards(prepared, WORLD, seed=3, epoch=0, num_epochs=2)[f"train_rank{r}"],
            limit=6,
            batch_size=2,
        )
        for r in range(WORLD)
    ]
    resumed = train_shards(prepared, WORLD, seed=3, epoch=0, start=12, num_epochs=2)
    after = [read(resumed[f"train_rank{r}"]) for r in range(WORLD)]
    for rank in range(WORLD):
        assert before[rank] + after[rank] == full[rank]
    # ... and at epoch 1 after 8 examples: the tail of the two-epoch stream, again exactly.
    later = train_shards(prepared, WORLD, seed=3, epoch=1, start=8)
    for rank in range(WORLD):
        assert read(later[f"train_rank{rank}"]) == full[rank][11 + 4 :]


def test_ray_train_data_config_hands_each_worker_its_shard_in_order(prepared):
    shards = train_shards(prepared, WORLD, seed=5, epoch=0, start=0, num_epochs=2, rows_per_read=2)
    expected = {name: read(ds) for name, ds in shards.items()}
    # What TorchTrainer(datasets=shards, dataset_config=shard_data_config()) gives each worker: Train's
    # ingest options replace the dataset's own, and the rank's read tasks run in parallel; the order must hold.
    per_worker = shard_data_config().configure(
        datasets=shards, world_size=WORLD, worker_handles=None, worker_node_ids=None
    )
    for rank, iterators in enumerate(per_worker):
        stream = read(iterators[f"train_rank{rank}"])
        assert stream == expected[f"train_rank{rank}"]
        assert [(epoch, pos) for epoch, pos, _ in stream] == [
            (e, p) for e in (0, 1) for p in range(rank, 22, WORLD)
        ]


def test_each_rank_reads_only_the_rows_of_its_own_shard(prepared, tmp_path):
    from spo_ray.data.store import RowIndex

    class CountingRows(RowIndex):  # the rows every read takes from the part files, per rank
        def read(self, ids):
            with open(tmp_path / "read.txt", "a", encoding="utf-8") as fh:
                fh.write(" ".join(map(str, ids)) + "\n")
            return super().read(ids)

    rows = CountingRows(
        **{f.name: getattr(prepared.train_rows, f.name) for f in dataclasses.fields(RowIndex)}
    )
    counted = dataclasses.replace(prepared, train_rows=rows)
    for rank in range(WORLD):
        (tmp_path / "read.txt").unlink(missing_ok=True)
        stream = read(train_shards(counted, WORLD, seed=2, epoch=0, rows_per_read=3)[f"train_rank{rank}"])
        taken = [int(i) for i in (tmp_path / "read.txt").read_text().split()]
        assert (
            sorted(taken) == sorted(ex for _, _, ex in stream) and len(taken) == shard_plan(N, WORLD).per_rank
        )
