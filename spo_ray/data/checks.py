"""What `spo-ray data validate` and `data inspect` compute: a full-read report and sample examples."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from spo_ray.data.pipeline import ROWS_PER_CHUNK, peek_num_responses
from spo_ray.data.processing import TOKENIZE_BATCH, Problem, check_count, iter_examples
from spo_ray.data.schema import Example, RowProblem
from spo_ray.data.sources import (
    Chunk,
    RawRow,
    Source,
    iter_chunk_rows,
    plan_chunks,
    resolve_sources,
    unread_files,
)
from spo_ray.data.templating import Templater

_KEEP_PROBLEMS = 1000


@dataclass
class ValidationReport:
    """Rows read, good, bad by reason, and the first problems in file order."""

    rows_read: int = 0
    ok: int = 0
    bad: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    lengths_checked: bool = False  # with a tokenizer only: rows are templated and measured
    prompts_truncated: int = 0
    responses_truncated: int = 0
    other_dimension: int = 0  # rows labelled only with dimensions other than --dimension (left out)
    dimension: str = ""  # --dimension (data.dimension); "": rows are not selected by dimension
    empty_files: list[str] = field(default_factory=list)  # files no row was read from
    unread_files: list[str] = field(default_factory=list)  # files in the given folders that are not read

    def add(self, raw: RawRow, problem: RowProblem, chunk: Chunk) -> None:
        """Count a bad row; keep its problem (up to the first thousand)."""
        self.bad[problem.reason] += 1
        if len(self.problems) < _KEEP_PROBLEMS:
            order = (chunk.index, raw.row)
            self.problems.append(Problem(raw.location, problem.field, problem.reason, problem.detail, order))

    def render(self, limit: int = 20) -> str:
        """The report as printed: counts, then up to `limit` problems as file:line: field: reason."""
        lines = [f"rows read: {self.rows_read}", f"ok: {self.ok}", f"bad: {sum(self.bad.values())}"]
        lines += [f"  {reason}: {count}" for reason, count in sorted(self.bad.items())]
        if self.dimension:
            lines.append(
                f"rows of other dimensions (left out by --dimension {self.dimension}): {self.other_dimension}"
            )
        if self.lengths_checked:
            lines.append(f"prompts cut from the left to --max-prompt-length: {self.prompts_truncated}")
            lines.append(f"rows with responses cut to --max-length: {self.responses_truncated}")
        else:
            lines.append(
                "lengths: not checked (no --tokenizer); give the model folder to template the rows and see "
                "what data.max_length would cut or refuse"
            )
        lines += [
            f"no rows in {path} (empty, blank lines, a CSV header only or [])" for path in self.empty_files
        ]
        lines += [
            f"not read: {path} (only .jsonl, .ndjson, .json, .parquet and .csv files are)"
            for path in self.unread_files
        ]
        first = sorted(self.problems, key=lambda p: p.order)[:limit]
        if first:
            lines.append(f"first {len(first)} problems:")
            lines += [f"  {problem}" for problem in first]
        return "\n".join(lines)


def _chunks(sources: list[Source]) -> list[Chunk]:
    return plan_chunks(sources, ROWS_PER_CHUNK, "train")


def _in_order(
    chunk: Chunk, pending: list[tuple[RawRow, Example | RowProblem | None]], templater: Templater | None
):
    examples = [item for _, item in pending if isinstance(item, Example)]
    encoded = iter(templater.encode(examples) if templater else [None] * len(examples))
    for raw, item in pending:
        tokens = next(encoded) if isinstance(item, Example) else None
        yield (chunk, raw, tokens, None) if isinstance(tokens, RowProblem) else (chunk, raw, item, tokens)


def _checked(
    chunks: list[Chunk], fmt: str, templater: Templater | None, dimension: str = ""
) -> Iterator[tuple]:
    """(chunk, raw row, Example or RowProblem, TokenizedExample or None) for every row, in file order; the
    item is None for a row `dimension` leaves out."""
    num_responses = peek_num_responses(chunks, fmt)
    for chunk in chunks:
        pending: list[tuple[RawRow, Example | RowProblem | None]] = []
        for raw, item in iter_examples(iter_chunk_rows(chunk), fmt, dimension=dimension):
            if isinstance(item, Example):
                item = check_count(item, num_responses) or item
            pending.append((raw, item))
            if len(pending) >= TOKENIZE_BATCH:
                yield from _in_order(chunk, pending, templater)
                pending = []
        yield from _in_order(chunk, pending, templater)


def _templater(
    tokenizer_path: str | None, max_length: int, max_prompt_length: int, on_long_rows: str = "truncate"
) -> Templater | None:
    if not tokenizer_path:
        return None
    return Templater.from_path(tokenizer_path, max_length, max_prompt_length, on_long_rows)


def validate_paths(
    paths: list[str],
    fmt: str = "auto",
    tokenizer_path: str | None = None,
    max_length: int = 512,
    max_prompt_length: int = 256,
    on_long_rows: str = "truncate",
    dimension: str = "",
) -> ValidationReport:
    """Read every row (no Ray, constant memory); with a tokenizer, lengths are checked (and cuts counted) too;
    with `dimension` (as data.dimension) rows are selected by their label as training selects them."""
    report = ValidationReport(
        lengths_checked=bool(tokenizer_path), unread_files=unread_files(paths), dimension=dimension
    )
    templater = _templater(tokenizer_path, max_length, max_prompt_length, on_long_rows)
    sources = resolve_sources(paths, "PATH")
    rows_by_file: Counter = Counter()
    for chunk, raw, item, tokens in _checked(_chunks(sources), fmt, templater, dimension):
        report.rows_read += 1
        rows_by_file[raw.path] += 1
        if item is None:  # labelled with other dimensions only: training leaves it out, not a problem
            report.other_dimension += 1
            continue
        if isinstance(item, RowProblem):
            report.add(raw, item, chunk)
            continue
        report.ok += 1
        if tokens is not None:
            report.prompts_truncated += tokens.prompt_truncated
            report.responses_truncated += tokens.responses_truncated
    report.empty_files = [source.path for source in sources if not rows_by_file[source.path]]
    return report


def inspect_paths(
    paths: list[str],
    n: int = 3,
    fmt: str = "auto",
    tokenizer_path: str | None = None,
    max_length: int = 512,
    max_prompt_length: int = 256,
) -> str:
    """The first n good rows normalized; with a tokenizer, the templated text and token counts too.

    Bad rows met before the n-th good one are listed after the examples.
    """
    templater = _templater(tokenizer_path, max_length, max_prompt_length)
    blocks: list[str] = []
    skipped: list[str] = []
    for _, raw, item, tokens in _checked(_chunks(resolve_sources(paths, "PATH")), fmt, templater):
        if len(blocks) >= n:
            break
        if isinstance(item, RowProblem):
            skipped.append(f"  {raw.location}: {item}")
            continue
        lines = [f"== {raw.location} (format {item.format})", "prompt:"]
        lines += [f"  {m['role']}: {json.dumps(m['content'], ensure_ascii=False)}" for m in item.prompt]
        ranks = {index: rank for rank, index in enumerate(item.ranking, start=1)}
        for j, response in enumerate(item.responses):
            rank = f"rank {ranks[j]}" if j in ranks else "unranked"
            lines.append(
                f"response {j} ({item.response_fields[j]}, {rank}): {json.dumps(response, ensure_ascii=False)}"
            )
        if tokens is not None:
            decode = templater.tokenizer.decode
            cut = ", cut from the left" if tokens.prompt_truncated else ""
            lines.append(f"-- templated prompt ({len(tokens.prompt_ids)} tokens{cut}):")
            lines.append(decode(tokens.prompt_ids))
            scored = "cut to fit max_length" if tokens.responses_truncated else "all scored"
            for j, ids in enumerate(tokens.response_ids):
                lines.append(f"-- templated response {j} ({len(ids)} tokens, {scored}):")
                lines.append(decode(ids))
        blocks.append("\n".join(lines))
    if skipped:
        blocks.append("bad rows passed over:\n" + "\n".join(skipped[:20]))
    if not blocks:
        return "no rows found"
    return "\n\n".join(blocks)
