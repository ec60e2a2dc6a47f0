"""Input files: resolve paths and globs, plan chunks, and stream raw rows with their file and line."""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from spo_ray.data.schema import RowProblem
from spo_ray.errors import DataError

if TYPE_CHECKING:
    from spo_ray.config import DataConfig

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Source:
    """One input: a file (jsonl, json, parquet, csv), a `save_to_disk` folder (disk) or a hub dataset (hub)."""

    kind: str
    path: str
    split: str = ""
    config: str = ""  # dataset config (subset) name, for kind hub
    group: int = 0  # which data.sources entry it belongs to (a mixture), else 0


@dataclass(frozen=True)
class Chunk:
    """A slice of one source that one task reads: bytes [start, stop) of a JSONL file, or rows [start, stop)."""

    index: int
    kind: str
    path: str
    start: int = 0
    stop: int = -1
    first_row: int = 0  # line number (JSONL, 1-based) or row index (others, 0-based) of the slice's first row
    split: str = ""  # dataset split, for kinds disk and hub
    role: str = "train"  # "train" or "eval": which dataset the chunk's rows go to
    rows: int = -1  # rows in the chunk, where known before reading (-1: a JSON list)
    config: str = ""  # dataset config name, for kind hub
    group: int = 0  # the source's data.sources entry (its column mapping and mixture weight)

    def to_json(self) -> str:
        """The chunk as one JSON string (what a task receives)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Chunk:
        """Inverse of to_json."""
        return cls(**json.loads(text))


@dataclass
class RawRow:
    """A decoded row (value) or a problem reading it, and where it came from."""

    path: str
    row: int
    line_based: bool
    value: Any = None
    problem: RowProblem | None = None
    raw: str | None = None  # the row's text (JSONL) for the quarantine

    @property
    def location(self) -> str:
        """`file:LINE` for JSONL and CSV, `file:row N` (0-based) for JSON lists, Parquet and datasets."""
        return f"{self.path}:{self.row}" if self.line_based else f"{self.path}:row {self.row}"


def _file_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".json"):
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "json" if head.startswith(b"[") else "jsonl"
    raise DataError(
        f"{path}: unsupported file type; use .jsonl, .json (a list), .parquet, .csv or a save_to_disk folder"
    )


def _is_dataset_folder(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in ("state.json", "dataset_dict.json"))


def _folder_files(folder: str) -> list[str]:
    return sorted(
        path for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(path)
    )


def _folder_sources(folder: str, split: str) -> list[Source]:
    if _is_dataset_folder(folder):
        return [Source("disk", folder, split)]
    files = [path for path in _folder_files(folder) if path.lower().endswith(DATA_SUFFIXES)]
    return [Source(_file_kind(path), path) for path in files]


def unread_files(patterns: list[str]) -> list[str]:
    """Files inside the folders of `patterns` that are not read (not .jsonl/.ndjson/.json/.parquet/.csv)."""
    unread: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        for path in matches:
            if os.path.isdir(path) and not _is_dataset_folder(path):
                unread += [f for f in _folder_files(path) if not f.lower().endswith(DATA_SUFFIXES)]
    return unread


def resolve_sources(patterns: list[str], key: str, split: str = "train") -> list[Source]:
    """Files, globs and folders of `patterns` (config key `key`, for errors) as an ordered list of sources."""
    sources: list[Source] = []
    for i, pattern in enumerate(patterns):
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        found = []
        for path in matches:
            if os.path.isdir(path):
                found += _folder_sources(path, split)
            elif os.path.isfile(path):
                found.append(Source(_file_kind(path), path))
        if not found:
            raise DataError(
                f"{key}[{i}]: '{pattern}' matches no data files (relative paths are from {os.getcwd()}); "
                f"give .jsonl/.json/.parquet/.csv files, a glob, or a save_to_disk folder"
            )
        sources += found
    return sources


def config_sources(cfg: DataConfig) -> tuple[list[Source], list[Source]]:
    """(train, eval) sources of a data config: train_files plus hf_dataset (or the data.sources mixture,
    each source tagged with its entry's index as `group`), and eval_files."""
    if cfg.sources:
        train = []
        for group, entry in enumerate(cfg.sources):
            found = resolve_sources(entry.files, f"data.sources[{group}].files", entry.hf_split)
            if entry.hf_dataset:
                found.append(Source("hub", entry.hf_dataset, entry.hf_split, entry.hf_config))
            train += [replace(source, group=group) for source in found]
        return train, resolve_sources(cfg.eval_files, "data.eval_files", cfg.hf_split)
    train = resolve_sources(cfg.train_files, "data.train_files", cfg.hf_split)
    if cfg.hf_dataset:
        train.append(Source("hub", cfg.hf_dataset, cfg.hf_split, cfg.hf_config))
    if not train:
        raise DataError("no training data: set data.train_files (files, globs, folders) or data.hf_dataset")
    return train, resolve_sources(cfg.eval_files, "data.eval_files", cfg.hf_split)


def _load_arrow(source_kind: str, path: str, split: str, config: str = ""):
    """A memory-mapped `datasets.Dataset` for a save_to_disk folder or a `load_dataset` dataset (config name)."""
    import datasets

    try:
        if source_kind == "disk":
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(path, config or None, split=split)
    except Exception as exc:  # datasets raises many types; the user needs the path and the cause
        raise DataError(f"{path}: could not load the dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split '{split}' (has {', '.join(loaded)}); set data.hf_split")
        loaded = loaded[split]
    return loaded


def plan_chunks(sources: list[Source], rows_per_chunk: int, role: str, first_index: int = 0) -> list[Chunk]:
    """Cut sources into chunks of about `rows_per_chunk` rows; reads JSONL once for line offsets."""
    chunks: list[Chunk] = []

    def add(**kw: Any) -> None:
        chunks.append(Chunk(index=first_index + len(chunks), role=role, **kw))

    def add_lines(source: Source, start: int, stop: int, first_line: int, rows: int) -> None:
        """A chunk of a JSONL file: bytes [start, stop), its first row on line `first_line`."""
        add(
            group=source.group,
            kind="jsonl",
            path=source.path,
            start=start,
            stop=stop,
            first_row=first_line,
            rows=rows,
        )

    for source in sources:
        group = source.group

        if source.kind == "jsonl":
            start, line, rows, offset = 0, 1, 0, 0
            with open(source.path, "rb") as fh:
                for number, text in enumerate(fh, start=1):
                    offset += len(text)
                    if not text.strip() and rows == 0:  # blank lines before a chunk's first row
                        start, line = offset, number + 1
                        continue
                    rows += 1
                    if rows == rows_per_chunk:
                        add_lines(source, start, offset, line, rows)
                        start, line, rows = offset, number + 1, 0
            if rows:  # the last, shorter chunk
                add_lines(source, start, offset, line, rows)
        elif source.kind in ("json", "csv"):  # one task reads the whole file
            add(group=group, kind=source.kind, path=source.path, first_row=1 if source.kind == "csv" else 0)
        else:
            if source.kind == "parquet":
                import pyarrow.parquet as pq

                total = pq.ParquetFile(source.path).metadata.num_rows
            else:
                total = len(_load_arrow(source.kind, source.path, source.split, source.config))
            for begin in range(0, total, rows_per_chunk):
                stop = min(total, begin + rows_per_chunk)
                add(
                    group=group,
                    kind=source.kind,
                    path=source.path,
                    start=begin,
                    stop=stop,
                    first_row=begin,
                    split=source.split,
                    config=source.config,
                )
    return chunks


def _decode_line(data: bytes, path: str, line: int) -> RawRow:
    row = RawRow(path, line, True)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        row.problem = RowProblem("<row>", "invalid_utf8", f"byte {exc.start} of the line is not valid UTF-8")
        row.raw = data.decode("utf-8", errors="replace")
        return row
    text = text.lstrip("\ufeff")  # a byte-order mark before the first row
    row.raw = text.rstrip("\r\n")
    try:
        row.value = json.loads(text)
    except json.JSONDecodeError as exc:
        row.problem = RowProblem("<row>", "invalid_json", f"{exc.msg} at column {exc.colno}")
    return row


def _iter_jsonl(chunk: Chunk) -> Iterator[RawRow]:
    with open(chunk.path, "rb") as fh:
        fh.seek(chunk.start)
        remaining = chunk.stop - chunk.start
        line = chunk.first_row
        while remaining > 0:
            data = fh.readline()
            if not data:
                break
            remaining -= len(data)
            if data.strip():
                yield _decode_line(data, chunk.path, line)
            line += 1


def _iter_json_list(chunk: Chunk) -> Iterator[RawRow]:
    with open(chunk.path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = RowProblem("<file>", "invalid_utf8", f"byte {exc.start} (line {line}) is not valid UTF-8")
        yield RawRow(chunk.path, 0, False, problem=problem)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}; no row of this file can be read"
        yield RawRow(chunk.path, 0, False, problem=RowProblem("<file>", "invalid_json", detail))
        return
    if not isinstance(items, list):
        detail = f"a .json file must hold a list of rows, got {type(items).__name__}; use JSONL for one row per line"
        yield RawRow(chunk.path, 0, False, problem=RowProblem("<file>", "wrong_type", detail))
        return
    for index, item in enumerate(items):
        yield RawRow(chunk.path, index, False, value=item)


def _iter_csv(chunk: Chunk) -> Iterator[RawRow]:
    """CSV rows as dicts keyed by the header's column names, each at the line where its record starts."""
    consumed: list[str] = []  # the text of the lines read since the last record (the record's raw text)
    bad_lines: set[int] = set()

    def lines() -> Iterator[str]:
        with open(chunk.path, "rb") as fh:
            for number, data in enumerate(fh, start=1):
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    bad_lines.add(number)
                    text = data.decode("utf-8", errors="replace")
                text = text.lstrip("\ufeff") if number == 1 else text
                consumed.append(text)
                yield text

    reader = csv.reader(lines())
    header: list[str] | None = None
    header_line = 1
    end = 0  # last line of the previous record
    while True:
        start = end + 1
        try:
            fields = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as exc:
            fields, problem = [], RowProblem("<row>", "invalid_csv", str(exc))
        end = reader.line_num
        raw, consumed[:] = "".join(consumed).rstrip("\r\n"), []
        if problem is None and not any(f.strip() for f in fields):
            continue  # a blank line
        if header is None:
            names = [name.strip() for name in fields]
            if problem or not all(names) or len(set(names)) != len(names):
                detail = (
                    f"the first line must name the columns, each once (e.g. prompt,chosen,rejected), got {raw!r}; "
                    f"no row of this file can be read"
                )
                yield RawRow(
                    chunk.path, start, True, problem=RowProblem("<file>", "invalid_csv", detail), raw=raw
                )
                return
            header, header_line = names, start
            continue
        if problem is None and bad_lines.intersection(range(start, end + 1)):
            problem = RowProblem("<row>", "invalid_utf8", "the row has bytes that are not valid UTF-8")
        if problem is None and len(fields) != len(header):
            detail = f"{len(fields)} fields, but the header (line {header_line}) names {len(header)} columns"
            problem = RowProblem("<row>", "invalid_csv", detail)
        value = None if problem else dict(zip(header, fields))
        yield RawRow(chunk.path, start, True, value=value, problem=problem, raw=raw)


def _iter_table(chunk: Chunk) -> Iterator[RawRow]:
    if chunk.kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(chunk.path)
        begin, groups = 0, []
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            if begin < chunk.stop and begin + size > chunk.start:
                groups.append((group, begin))
            begin += size
        if not groups:
            return
        table = parquet.read_row_groups([g for g, _ in groups])
        rows = table.slice(chunk.start - groups[0][1], chunk.stop - chunk.start).to_pylist()
    else:
        dataset = _load_arrow(chunk.kind, chunk.path, chunk.split, chunk.config)
        rows = dataset.with_format("arrow")[chunk.start : chunk.stop].to_pylist()
    for offset, value in enumerate(rows):
        yield RawRow(chunk.path, chunk.start + offset, False, value=value)


def iter_chunk_rows(chunk: Chunk) -> Iterator[RawRow]:
    """Every row of a chunk in file order, decoded, or with the reason it could not be decoded."""
    if chunk.kind == "jsonl":
        return _iter_jsonl(chunk)
    if chunk.kind == "json":
        return _iter_json_list(chunk)
    if chunk.kind == "csv":
        return _iter_csv(chunk)
    return _iter_table(chunk)
