"""Random access to the tokenized rows: example id -> part file and row, read from memory-mapped Arrow files.

The tokenized parts are Arrow IPC files (uncompressed), so a reader maps them and takes just the rows it
needs: a rank reads its own shard's rows and no others (README.md, "Sharding and resume").
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from spo_ray.data.permutation import inverse_permute, permute

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

_MAPPED: dict[
    str, tuple[mmap.mmap, Any]
] = {}  # part path -> (mapping, table), per process (Ray reuses workers)
_MAX_MAPPED = 512


def _mapped(path: str) -> pa.Table:
    import pyarrow as pa

    entry = _MAPPED.get(path)
    if entry is None:
        if len(_MAPPED) >= _MAX_MAPPED:
            _MAPPED.clear()
        with open(path, "rb") as fh:
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        with pa.ipc.open_file(pa.py_buffer(mapping)) as reader:
            entry = (mapping, reader.read_all())  # zero-copy: pages are read when a row is taken
        _MAPPED[path] = entry
    return entry[1]


def release_pages(path: str | None = None) -> None:
    """Unmap the pages this process touched in the part `path` (default: in every part); they stay in the
    OS page cache, and the next read faults them in again. Without this, a worker that reads rows from
    every part keeps every page it touched resident: its RSS grew with the dataset, not with what one
    read holds. A read releases each part as soon as it has taken its rows: the kernel maps 64 KB around
    each faulted page, so one read of 1,024 rows scattered over every part otherwise held most of a
    500k-row dataset's pages at once (RSS +300 MB, file-backed) until it ended."""
    entries = _MAPPED.values() if path is None else [_MAPPED[path]] if path in _MAPPED else []
    for mapping, _ in entries:
        mapping.madvise(mmap.MADV_DONTNEED)


@dataclass(frozen=True)
class RowIndex:
    """Where each example id of one dataset (train or eval) lives in the part files.

    Global row g is row g - starts[i] of parts[i]. Without a split, example_id = g. With an eval split
    of `split_eval` rows, g's split number is permute(g, total, split_key): numbers below split_eval are
    eval ids, the others are train ids (number - split_eval). `columns` adds per-example arrays
    (`name`, .npy path of shape [num_rows, n]) indexed by example id, e.g. precomputed ref_logps.
    """

    parts: tuple[str, ...]
    starts: tuple[int, ...]  # len(parts) + 1: first global row of each part, then the total
    num_rows: int
    split_eval: int = 0
    split_key: int = 0
    held_out: bool = False  # the eval side of the split
    columns: tuple[tuple[str, str], ...] = ()
    selection: str = ""  # a mixture (data.sources): .npy of global rows, example id k -> row selection[k]

    @property
    def total(self) -> int:
        """Rows in all the parts (both sides of a split)."""
        return self.starts[-1]

    def with_column(self, name: str, npy_path: str) -> RowIndex:
        """This index plus (or with a new) per-example column read from `npy_path`."""
        kept = tuple((n, p) for n, p in self.columns if n != name)
        return replace(self, columns=(*kept, (name, str(npy_path))))

    def global_rows(self, ids: np.ndarray) -> np.ndarray:
        """Global row numbers of example ids."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.selection:  # a mixture has no eval split (validation refuses data.eval_fraction then)
            return np.asarray(np.load(self.selection, mmap_mode="r")[ids], dtype=np.int64)
        if not self.split_eval:
            return ids
        numbers = ids if self.held_out else ids + self.split_eval
        return inverse_permute(numbers, self.total, self.split_key)

    def example_ids(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the global rows that belong to this dataset, their example ids)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.split_eval:
            return np.ones(len(rows), dtype=bool), rows
        numbers = permute(rows, self.total, self.split_key)
        mask = numbers < self.split_eval if self.held_out else numbers >= self.split_eval
        return mask, numbers[mask] - (0 if self.held_out else self.split_eval)

    def read(self, ids: np.ndarray) -> pa.Table:
        """The rows of `ids`, in that order: example_id, the token columns and the extra columns.

        Only these rows are taken from the memory-mapped parts (no other row is decoded)."""
        import pyarrow as pa

        ids = np.asarray(ids, dtype=np.int64)
        order, by_part = self._by_part(self.global_rows(ids))
        pieces = list(by_part)
        table = pa.concat_tables(pieces)
        if len(pieces) > 1:
            table = table.take(pa.array(np.argsort(order, kind="stable")))  # back to the order of `ids`
        return self._finish(table, ids)

    def _by_part(self, rows: np.ndarray) -> tuple[np.ndarray, Iterator[pa.Table]]:
        """(the order that groups global `rows` by part, keeping their order inside a part; the rows of each
        part in that order). Each part's pages are released once its rows are copied out, so a read holds
        one part's pages at a time (see `release_pages`)."""
        import pyarrow as pa

        part = np.searchsorted(np.asarray(self.starts), rows, side="right") - 1
        order = np.argsort(part, kind="stable")

        def pieces() -> Iterator[pa.Table]:
            for index in np.unique(part):
                mine = order[part[order] == index]
                piece = _mapped(self.parts[index]).take(pa.array(rows[mine] - self.starts[index]))  # a copy
                release_pages(self.parts[index])
                yield piece

        return order, pieces()

    def _finish(self, table: pa.Table, ids: np.ndarray) -> pa.Table:
        import pyarrow as pa

        table = table.add_column(0, "example_id", pa.array(ids, type=pa.int64()))
        for name, path in self.columns:
            values = np.load(path, mmap_mode="r")[ids]  # [rows, n]
            table = table.append_column(name, pa.array(values.tolist(), type=pa.list_(pa.float64())))
        return table

    def scan_part(self, index: int) -> pa.Table:
        """Every row of part `index` that belongs to this dataset, in file order (not for a mixture)."""
        import pyarrow as pa

        if self.selection:
            raise ValueError("a mixture's rows are read by example id (RowIndex.read), not part by part")
        release_pages()  # the previous part's pages: a scan holds one part at a time
        table = _mapped(self.parts[index])
        mask, ids = self.example_ids(np.arange(self.starts[index], self.starts[index + 1]))
        if not mask.all():
            table = table.filter(pa.array(mask))
        return self._finish(table, ids)

    def dataset(self) -> ray.data.Dataset:
        """A lazy dataset of every row, part by part (one read task per part file); a mixture's by id."""
        import ray.data

        if self.selection:
            return self.blocks(4096)
        items = [{"part": i} for i in range(len(self.parts))]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        return ds.map_batches(_scan_parts, batch_size=1, batch_format="numpy", fn_kwargs={"index": self})

    def blocks(self, rows_per_block: int) -> ray.data.Dataset:
        """A lazy dataset of every row in example-id order, in blocks of `rows_per_block` rows (so a pool
        of actors shares the work evenly, and each block is the same batch whoever processes it)."""
        import ray.data

        items = [
            {"first": f, "count": min(rows_per_block, self.num_rows - f)}
            for f in range(0, self.num_rows, rows_per_block)
        ]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        return ds.map_batches(_read_ids, batch_size=1, batch_format="numpy", fn_kwargs={"index": self})


def _read_ids(batch: dict[str, np.ndarray], index: RowIndex) -> Any:
    import pyarrow as pa

    return pa.concat_tables(
        [index.read(np.arange(int(f), int(f) + int(c))) for f, c in zip(batch["first"], batch["count"])]
    )


def _scan_parts(batch: dict[str, np.ndarray], index: RowIndex) -> Any:
    import pyarrow as pa

    return pa.concat_tables([index.scan_part(int(i)) for i in batch["part"]])
