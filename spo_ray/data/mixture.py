"""Several sources into one training set: column mappings per source and the weighted, seeded mixture.

A mixture (`data.sources`) of size M (`data.mixture_size`, 0: all sources' rows together) takes
round(M * w_i / sum w) rows from source i (largest remainders make the counts sum to M). A source with more
rows than that gives a seeded sample without replacement; one with fewer gives every row once per full
pass, then a seeded sample of the rest. The chosen global rows are stored as `mixture.npy` in the
tokenized-data cache folder; example id k of the training set is row selection[k].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from spo_ray.data.permutation import derive_key
from spo_ray.data.sources import Chunk, iter_chunk_rows
from spo_ray.errors import ConfigError, DataError

if TYPE_CHECKING:
    from spo_ray.config import DataConfig

MIXTURE_FILE = "mixture.npy"


def column_maps(cfg: DataConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """{group: (config key, {field: column})} for each source group that renames columns."""
    if not cfg.sources:
        return {"0": ("data.columns", dict(cfg.columns))} if cfg.columns else {}
    maps = {}
    for group, entry in enumerate(cfg.sources):
        if entry.columns:
            maps[str(group)] = (f"data.sources[{group}].columns", dict(entry.columns))
        elif cfg.columns:
            maps[str(group)] = ("data.columns", dict(cfg.columns))
    return maps


def check_columns(chunks: list[Chunk], maps: dict[str, tuple[str, dict[str, str]]]) -> None:
    """Each input file has the columns its mapping names (read from its first row): a ConfigError names
    the key (`data.columns.prompt`), the file and the columns it has."""
    seen: set[str] = set()
    for chunk in chunks:
        if str(chunk.group) not in maps or chunk.path in seen:
            continue
        seen.add(chunk.path)
        key, columns = maps[str(chunk.group)]
        first = next((raw.value for raw in iter_chunk_rows(chunk) if raw.problem is None), None)
        if not isinstance(first, dict):
            continue  # no readable row: the bad-row policy reports it
        for name, column in columns.items():
            if column not in first:
                raise ConfigError(
                    f"{key}.{name}",
                    f"column '{column}' is not in {chunk.path} (its columns: {', '.join(map(str, first))})",
                )


def mixture_selection(
    rows_by_group: list[np.ndarray], weights: list[float], size: int, seed: int
) -> tuple[np.ndarray, list[int]]:
    """(global rows of the mixture, rows taken from each source); see the module docstring for the rule."""
    available = [len(rows) for rows in rows_by_group]
    total = size or sum(available)
    shares = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(shares).astype(np.int64)
    for i in np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1  # largest remainders: the counts sum to the mixture's size
    picked = []
    for group, (rows, count) in enumerate(zip(rows_by_group, counts.tolist())):
        if count and not len(rows):
            raise DataError(f"data.sources[{group}]: no usable rows, but its weight asks for {count}")
        if not count:
            continue
        rng = np.random.default_rng(derive_key(seed, "mixture", group))
        passes, rest = divmod(count, len(rows))
        local = np.concatenate(
            [np.tile(np.arange(len(rows)), passes), rng.choice(len(rows), rest, replace=False)]
        )
        picked.append(rows[np.sort(local)])
    selection = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return selection.astype(np.int64), counts.tolist()
