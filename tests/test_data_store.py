"""The memory-mapped row store: reading rows keeps no part pages resident (RSS bounded whatever the rows)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from spo_ray.data.store import RowIndex

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _resident_kb(folder: Path) -> int:
    """This process's resident kB in mappings of files under `folder` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5].startswith(str(folder))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def _write_parts(folder: Path, parts: int, rows: int, tokens: int) -> RowIndex:
    import pyarrow as pa

    schema = pa.schema(
        [("prompt_ids", pa.list_(pa.int32())), ("response_ids", pa.list_(pa.list_(pa.int32())))]
    )
    paths, starts = [], [0]
    for index in range(parts):
        first = index * rows
        table = pa.table(
            {
                "prompt_ids": [[first + i] * tokens for i in range(rows)],
                "response_ids": [[[first + i], [first + i, 1]] for i in range(rows)],
            },
            schema=schema,
        )
        path = folder / f"part-{index:06d}.arrow"
        with pa.ipc.new_file(str(path), schema) as writer:
            writer.write_table(table)
        paths.append(str(path))
        starts.append(first + rows)
    return RowIndex(tuple(paths), tuple(starts), starts[-1])


def test_reading_rows_from_every_part_leaves_none_of_their_pages_resident(tmp_path):
    index = _write_parts(tmp_path, parts=4, rows=4000, tokens=96)  # about 1.5 MB of token ids per part
    ids = np.random.default_rng(0).permutation(index.num_rows)
    for first in range(0, len(ids), 1000):  # an epoch in shuffled reads of 1000 rows, as train_shards reads
        batch = ids[first : first + 1000]
        table = index.read(batch)
        assert [row[0] for row in table["prompt_ids"].to_pylist()] == batch.tolist()
    # before: each part stayed mapped with every page an epoch touched, 6 MB here, the whole dataset at scale
    assert _resident_kb(tmp_path) < 256


def test_a_read_holds_the_pages_of_one_part_at_a_time(tmp_path):
    """One read of rows scattered over every part (train_shards' reads, 1,024 rows, touch every part of a
    500k-row dataset) must not hold all those parts' pages until it ends: the kernel maps 64 KB around
    each faulted page, and such a read held 300 MB of a 330 MB dataset in a worker before the fix."""
    index = _write_parts(tmp_path, parts=6, rows=4000, tokens=96)
    rows = np.random.default_rng(1).permutation(index.num_rows)[:3000]  # ~500 rows in each part
    _, pieces = index._by_part(rows)
    held = []
    for piece in pieces:
        assert piece.num_rows > 0
        held.append(_resident_kb(tmp_path))  # after each part's rows were taken
    assert len(held) == 6
    assert max(held) < 256, held  # released after the whole read: 1.6, 3.2, ... 9.7 MB
    table = index.read(rows)
    assert [row[0] for row in table["prompt_ids"].to_pylist()] == rows.tolist()
