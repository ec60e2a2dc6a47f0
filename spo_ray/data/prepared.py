"""`PreparedData`: what the pipeline hands the trainer (tokenized rows, their index, and what was found)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ray.data

    from spo_ray.data.store import RowIndex


@dataclass
class PreparedData:
    """Tokenized train/eval datasets and what the pipeline found. Rows: example_id (dense, stable),
    prompt_ids, response_ids (n lists, best first), ranking (n ints: 0..k-1 for the k ranked responses, then
    -1; best-of-n is [0, -1, ..., -1]; SPPO self-play rows have none and carry win_prob instead).
    """

    train: ray.data.Dataset
    eval: ray.data.Dataset | None
    train_rows: RowIndex  # random access by example id (what `train_shards` reads)
    eval_rows: RowIndex | None
    num_train: int
    num_responses: int
    bad_rows: dict[str, int]
    quarantine_path: str | None
    num_eval: int = 0
    rows_read: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    pad_token_id: int = 0
    empty_files: list[str] = field(default_factory=list)  # input files that held no rows
    unread_files: list[str] = field(default_factory=list)  # files in data folders that are not read
    cache_dir: str = ""  # OUTPUT/data/<key>: the tokenized parts
    cache_reused: bool = False  # the parts came from an earlier preparation of the same inputs
    mixture: list[dict] = field(default_factory=list)  # per data.sources entry: weight, rows, rows taken

    def with_column(self, name: str, npy_path: str) -> PreparedData:
        """A copy whose train rows carry a per-example column (a .npy array [num_train, n] by example id)."""
        rows = self.train_rows.with_column(name, npy_path)
        return replace(self, train_rows=rows, train=rows.dataset())

    def notes(self) -> list[str]:
        """The console lines a run prints after preparing its data: what was cut, skipped or not read."""
        lines = [self.truncation_note(), self.skipped_note()]
        if self.mixture:
            taken = ", ".join(
                f"[{i}] {m['taken']} of {m['rows']} rows (weight {m['weight']:g})"
                for i, m in enumerate(self.mixture)
            )
            lines.append(f"data: mixture of {self.num_train} rows from data.sources: {taken}")
        if self.cache_reused:
            lines.append(
                f"data: reusing the tokenized data in {self.cache_dir} (same files, tokenizer and settings)"
            )
        if self.empty_files:
            lines.append(
                f"data: {len(self.empty_files)} input files hold no rows: {_names(self.empty_files)}"
            )
        if self.unread_files:
            lines.append(
                f"data: {len(self.unread_files)} files in the data folders are not read (only .jsonl, .ndjson, "
                f".json, .parquet and .csv are): {_names(self.unread_files)}"
            )
        return [line for line in lines if line]

    def skipped_note(self) -> str | None:
        """One console line on the rows left out (data.on_bad_rows / on_long_rows=skip), or None when none were."""
        skipped = sum(self.bad_rows.values())
        if not skipped:
            return None
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.bad_rows.items()))
        return (
            f"data: skipped {skipped} of {self.rows_read} rows ({reasons}); each one, with its file:line and "
            f"reason, is in {self.quarantine_path}"
        )

    def truncation_note(self) -> str | None:
        """One console line on what the truncation policy cut, or None when nothing was cut."""
        if not (self.prompts_truncated or self.responses_truncated):
            return None
        return (
            f"data: {self.prompts_truncated} of {self.rows_read} rows had their prompt cut from the left to "
            f"data.max_prompt_length, {self.responses_truncated} their responses cut to data.max_length"
        )

    def summary(self) -> dict[str, Any]:
        """Counts for the run's summary.json."""
        return {
            "rows_read": self.rows_read,
            "num_train": self.num_train,
            "num_eval": self.num_eval,
            "num_responses": self.num_responses,
            "bad_rows": dict(self.bad_rows),
            "prompts_truncated": self.prompts_truncated,
            "responses_truncated": self.responses_truncated,
            "quarantine_path": self.quarantine_path,
            **({"mixture": self.mixture} if self.mixture else {}),
        }


def _names(paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
