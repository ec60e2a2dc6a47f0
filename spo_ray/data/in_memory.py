"""In-memory datasets handed to the Python API, written once as files the pipeline reads like any other.

`spo_ray.train(cfg, train_dataset=...)` accepts a list of dicts, a pandas DataFrame, a Hugging Face
`datasets.Dataset`, a `ray.data.Dataset`, or paths. Objects are written into the run's local scratch
(`<work>/inputs/`) and the paths go into `data.train_files` / `data.eval_files`, so validation, bad-row
handling, the tokenized cache (keyed by content) and resume behave exactly as for files. A list or a
DataFrame becomes JSONL, so a bad row is reported as `train_dataset.jsonl:N` (row N - 1 of the object).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from spo_ray.errors import UserError

ACCEPTED = (
    "a list of dicts, a pandas DataFrame, a datasets.Dataset, a ray.data.Dataset, "
    "or a path / list of paths (.jsonl, .json, .parquet, .csv, globs, folders, save_to_disk folders)"
)


def dataset_files(dataset: Any, folder: str | os.PathLike, name: str) -> list[str]:
    """The files holding `dataset` (written into `folder` as `<name>.*` when it is an object)."""
    if isinstance(dataset, (str, os.PathLike)):
        return [os.fspath(dataset)]
    if (
        isinstance(dataset, (list, tuple))
        and dataset
        and all(isinstance(p, (str, os.PathLike)) for p in dataset)
    ):
        return [os.fspath(p) for p in dataset]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(dataset, (list, tuple)):
        return [_write_jsonl(dataset, folder / f"{name}.jsonl", name)]
    if _is_a(dataset, "pandas", "DataFrame"):
        return [_write_jsonl(dataset.to_dict(orient="records"), folder / f"{name}.jsonl", name)]
    if _is_a(dataset, "datasets", "DatasetDict") or _is_a(dataset, "datasets", "IterableDatasetDict"):
        raise UserError(
            f"{name} is a DatasetDict with splits {list(dataset)}: pass one split, e.g. {name}=ds['train']"
        )
    if _is_a(dataset, "datasets", "Dataset"):
        path = folder / f"{name}.parquet"
        partial = path.with_name(path.name + ".partial")
        dataset.to_parquet(str(partial))
        os.replace(partial, path)
        return [str(path)]
    if _is_a(dataset, "ray.data", "Dataset"):
        return [_write_ray_dataset(dataset, folder / f"{name}.parquet", name)]
    raise UserError(f"{name} is a {type(dataset).__module__}.{type(dataset).__name__}; give {ACCEPTED}")


def _is_a(value: Any, module: str, name: str) -> bool:
    """isinstance against `module.name` without importing it (an object of an unimported class is not one)."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, name))


def _write_jsonl(rows: Any, path: Path, name: str) -> str:
    """Rows as JSON lines, written under a temporary name and moved into place (never half a file)."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as fh:
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserError(
                    f"{name}[{index}] is a {type(row).__name__}; each row must be a dict such as "
                    '{"prompt": ..., "chosen": ..., "rejected": ...}'
                )
            try:
                fh.write(json.dumps(row, ensure_ascii=False, default=_plain) + "\n")
            except TypeError as exc:
                raise UserError(
                    f"{name}[{index}]: {exc}; rows must hold text, numbers, lists and dicts"
                ) from None
    os.replace(partial, path)
    return str(path)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (as pandas and Arrow hand them out) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _write_ray_dataset(dataset: Any, path: Path, name: str) -> str:
    """Stream a ray.data.Dataset's blocks to one Parquet file on the driver (every node's rows, one file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    partial = path.with_name(path.name + ".partial")
    writer = None
    try:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=4096):
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            if writer is None:
                writer = pq.ParquetWriter(str(partial), table.schema)
            elif table.schema != writer.schema:
                try:
                    table = table.cast(writer.schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                    raise UserError(
                        f"{name}: its blocks have different columns or types ({exc}); "
                        "give every row the same fields"
                    ) from None
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise UserError(f"{name} is an empty ray.data.Dataset")
    os.replace(partial, path)
    return str(path)
