"""The work on one chunk, run inside Ray Data tasks: read, normalize, tokenize, write an Arrow part + quarantine."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from spo_ray.data.schema import Example, RowProblem, normalize_row, row_dimensions
from spo_ray.data.sources import Chunk, RawRow, iter_chunk_rows
from spo_ray.data.templating import Templater

TOKENIZE_BATCH = 256  # rows per tokenizer call
ROW_GROUP = 2048  # rows per Arrow record batch
MAX_PROBLEMS = 20  # problems kept per chunk (counts are always complete)


@dataclass
class Problem:
    """A bad row, as reported: `location: field: reason: detail`."""

    location: str
    field: str
    reason: str
    detail: str
    order: tuple[int, int] = (0, 0)  # (chunk index, row) sorts problems in file order

    def __str__(self) -> str:
        return f"{self.location}: {RowProblem(self.field, self.reason, self.detail)}"


def rename_columns(value: Any, columns: dict[str, str], key: str = "data.columns") -> Any:
    """A row whose columns are renamed to fields per `columns` ({field: column}, config key `key`)."""
    if not columns or not isinstance(value, dict):
        return value
    row = {name: item for name, item in value.items() if name not in columns.values()}
    for name, column in columns.items():
        if column not in value:
            raise RowProblem(column, "missing_field", f"no column '{column}' (named by {key}.{name})")
        row[name] = value[column]
    return row


def iter_examples(
    raw_rows: Iterator[RawRow],
    fmt: str,
    columns: dict[str, str] | None = None,
    key: str = "data.columns",
    dimension: str = "",
) -> Iterator[tuple[RawRow, Example | RowProblem | None]]:
    """Each raw row (its columns renamed per `columns`) with its normalized Example, or the RowProblem
    that keeps it out; with `dimension` (data.dimension) rows labelled with other dimensions give None."""
    for raw in raw_rows:
        if raw.problem is not None:
            yield raw, raw.problem
            continue
        try:
            row = rename_columns(raw.value, columns or {}, key)
            if dimension and dimension not in row_dimensions(row):
                yield raw, None
                continue
            yield raw, normalize_row(row, fmt)
        except RowProblem as problem:
            yield raw, problem


def check_count(example: Example, num_responses: int) -> RowProblem | None:
    """All rows of a dataset have the same number of responses (batches stack them)."""
    if len(example.responses) == num_responses:
        return None
    return RowProblem(
        "responses",
        "wrong_count",
        f"{len(example.responses)} responses, but this dataset's rows have {num_responses} "
        f"(its first row decides); put rows with other counts in a separate dataset",
    )


@dataclass
class ChunkResult:
    """What a chunk task reports back to the driver (small: counts and the first problems)."""

    index: int
    role: str
    read: int = 0
    good: int = 0
    truncated: int = 0  # rows whose prompt was cut from the left
    responses_truncated: int = 0  # rows whose responses were cut to fit max_length
    fatal: bool = False  # a bad row that stops the run (see `is_fatal`) was met
    other_dimension: int = 0  # rows labelled with dimensions other than data.dimension (left out)
    bad: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    part: str | None = None  # the Arrow IPC file of the good rows (None: no good row)
    quarantine: str | None = None

    def to_json(self) -> str:
        """The result as one JSON string (what a task returns)."""
        data = {**self.__dict__, "bad": dict(self.bad), "problems": [p.__dict__ for p in self.problems]}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ChunkResult:
        """Inverse of to_json."""
        data = json.loads(text)
        problems = [Problem(**{**p, "order": tuple(p["order"])}) for p in data.pop("problems")]
        return cls(**{**data, "bad": Counter(data["bad"])}, problems=problems)


class _Writer:
    """Good rows to `part-NNNNNN.arrow` (uncompressed Arrow IPC, memory-mappable: store.py takes single rows
    from it), bad rows to a quarantine part."""

    def __init__(self, result: ChunkResult, out_dir: str):
        self.result, self.out_dir = result, out_dir
        self.table_writer = None
        self.quarantine = None
        self.buffered: list = []

    def rows(self, encoded: list) -> None:
        self.buffered += encoded
        if len(self.buffered) >= ROW_GROUP:
            self._write()

    def _write(self) -> None:
        import pyarrow as pa

        columns = [
            ("prompt_ids", pa.list_(pa.int32())),
            ("response_ids", pa.list_(pa.list_(pa.int32()))),
            ("ranking", pa.list_(pa.int32())),
        ]
        rows, self.buffered = self.buffered, []
        n = len(rows[0].response_ids)
        data = {
            "prompt_ids": [e.prompt_ids for e in rows],
            "response_ids": [e.response_ids for e in rows],
            "ranking": [e.ranking + [-1] * (n - len(e.ranking)) for e in rows],  # best-of-n: -1 pads
        }
        if any(e.win_probs for e in rows):  # SPPO self-play rows
            columns.append(("win_prob", pa.list_(pa.float64())))
            data["win_prob"] = [e.win_probs for e in rows]
        schema = pa.schema(columns)
        table = pa.table(data, schema=schema)
        if self.table_writer is None:
            path = os.path.join(self.subfolder(self.result.role), f"part-{self.result.index:06d}.arrow")
            self.table_writer = pa.ipc.new_file(path, schema)
            self.result.part = path
        self.table_writer.write_table(table)

    def subfolder(self, name: str) -> str:
        """`out_dir/name`, made inside `out_dir` but never `out_dir` itself: a task that outlives its killed
        preparation, whose `.tmp-*` folder the next preparation removed, fails here instead of recreating it."""
        path = os.path.join(self.out_dir, name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)  # FileNotFoundError when out_dir is gone
        return path

    def bad(self, raw: RawRow, problem: RowProblem) -> None:
        if self.quarantine is None:
            path = os.path.join(self.subfolder("quarantine"), f"quarantine-{self.result.index:06d}.jsonl")
            self.quarantine = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self.result.quarantine = path
        record = {
            "location": raw.location,
            "file": raw.path,
            "line" if raw.line_based else "row": raw.row,
            "field": problem.field,
            "reason": problem.reason,
            "message": f"{raw.location}: {problem}",
            "data": raw.value if raw.problem is None else raw.raw,
        }
        self.quarantine.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def close(self) -> None:
        if self.buffered:
            self._write()
        if self.table_writer is not None:
            self.table_writer.close()
        if self.quarantine is not None:
            self.quarantine.close()


def is_fatal(problem: RowProblem | Problem, settings: dict[str, Any]) -> bool:
    """Whether a problem stops the run: a too-long row under on_long_rows=error, any other under on_bad_rows=error."""
    if problem.reason == "too_long":
        return settings["on_long_rows"] == "error"
    return settings["on_bad_rows"] == "error"


def process_chunk(chunk: Chunk, settings: dict[str, Any]) -> ChunkResult:
    """Read, normalize and tokenize one chunk; stop at its first fatal bad row (see `is_fatal`)."""
    templater = Templater.from_path(
        settings["tokenizer_path"],
        settings["max_length"],
        settings["max_prompt_length"],
        settings["on_long_rows"],
    )
    result = ChunkResult(chunk.index, chunk.role)
    writer = _Writer(result, settings["out_dir"])
    pending: list[tuple[RawRow, Example | RowProblem]] = []  # in file order, bad rows included

    def record(raw: RawRow, problem: RowProblem) -> None:
        result.bad[problem.reason] += 1
        fatal = is_fatal(problem, settings)
        result.fatal = result.fatal or fatal
        if len(result.problems) < MAX_PROBLEMS or fatal:  # a chunk stops at its first fatal problem
            order = (chunk.index, raw.row)
            result.problems.append(
                Problem(raw.location, problem.field, problem.reason, problem.detail, order)
            )
        writer.bad(raw, problem)

    def flush() -> None:
        encoded = iter(templater.encode([item for _, item in pending if isinstance(item, Example)]))
        good = []
        for raw, item in pending:
            item = next(encoded) if isinstance(item, Example) else item
            if isinstance(item, RowProblem):
                record(raw, item)
            else:
                good.append(item)
                result.truncated += item.prompt_truncated
                result.responses_truncated += item.responses_truncated
        if good:
            writer.rows(good)
            result.good += len(good)
        pending.clear()

    try:
        key, columns = settings.get("columns", {}).get(str(chunk.group), ("data.columns", {}))
        dimension = settings.get("dimension", "")
        for raw, item in iter_examples(iter_chunk_rows(chunk), settings["format"], columns, key, dimension):
            result.read += 1
            if item is None:  # another dimension's row (Sequential PO stages train one dimension each)
                result.other_dimension += 1
                continue
            if isinstance(item, Example):
                item = check_count(item, settings["num_responses"]) or item
            pending.append((raw, item))
            if len(pending) >= TOKENIZE_BATCH or (isinstance(item, RowProblem) and is_fatal(item, settings)):
                flush()
            if result.fatal:
                break
        if pending and not result.fatal:
            flush()
    finally:
        writer.close()
    return result
