"""Prompt files (one reader for every command) and the global-KL regularizer's prompts (data.reg_prompts_file,
else the training prompts)."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from spo_ray.data.schema import RowProblem, parse_prompt
from spo_ray.data.sources import DATA_SUFFIXES, config_sources, iter_chunk_rows, plan_chunks, resolve_sources
from spo_ray.data.templating import Templater
from spo_ray.errors import DataError

if TYPE_CHECKING:
    from spo_ray.config import DataConfig

_BATCH = 512


@dataclass(frozen=True)
class PromptSet:
    """Token-id prompts in two flat arrays (cheap to put in Ray's object store and share read-only):
    prompt i is ids[offsets[i]:offsets[i + 1]]."""

    ids: np.ndarray  # [total tokens] int32
    offsets: np.ndarray  # [num prompts + 1] int64

    @classmethod
    def from_lists(cls, prompts: list[list[int]]) -> PromptSet:
        """Pack lists of token ids."""
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.fromiter((t for p in prompts for t in p), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> list[int]:
        return self.ids[self.offsets[index] : self.offsets[index + 1]].tolist()


def read_prompts(
    path: str | os.PathLike,
    key: str,
    *,
    token_ids: bool = False,
    keep_text: bool = False,
    dedupe: bool = False,
    skip_bad: bool = False,
) -> list[Any]:
    """The prompts of a file, in file order: a text file holds one prompt per line; .jsonl/.json/.parquet/.csv
    rows (or a glob or folder of them) hold 'prompt': a string, chat messages, or token ids (`token_ids`).

    Each prompt comes as chat messages (a string is one user message; `keep_text` keeps it a string) or a
    list of ids. A bad row raises DataError naming file:line and `key`, the config key or argument that
    named the file; `skip_bad` leaves bad rows out and prints how many. `dedupe` keeps first occurrences.
    """
    text = os.fspath(path)
    prompts: list[Any] = []
    seen: set[str] = set()
    skipped: Counter[str] = Counter()
    first_skipped = ""
    for location, value, problem in _prompt_rows(text, key):
        try:
            if problem is not None:
                raise problem
            prompt = _parse(value, token_ids)
        except RowProblem as bad:
            if not skip_bad:
                raise DataError(f"{location}: {bad} ({key})") from None
            skipped[bad.reason] += 1
            first_skipped = first_skipped or f"{location}: {bad}"
            continue
        if dedupe:
            identity = json.dumps(prompt, sort_keys=True)
            if identity in seen:
                continue
            seen.add(identity)
        prompts.append(value if keep_text and isinstance(value, str) else prompt)
    if skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
        print(
            f"data: skipped {skipped.total()} bad rows of {key}={text} ({reasons}; data.on_bad_rows=skip); "
            f"the first: {first_skipped}",
            flush=True,
        )
    if not prompts:
        raise DataError(f"{key}: prompts file '{text}' holds no prompts" + (" it can use" if skipped else ""))
    return prompts


def _prompt_rows(path: str, key: str) -> Iterator[tuple[str, Any, RowProblem | None]]:
    """(file:line, the prompt as written, or the problem reading its row) for every prompt of `path`."""
    if not glob.has_magic(path) and not os.path.exists(path):
        raise DataError(
            f"{key}: prompts file '{path}' does not exist (relative paths are from {os.getcwd()})"
        )
    if os.path.isfile(path) and not path.lower().endswith(DATA_SUFFIXES):  # text: one prompt per line
        with open(path, "rb") as fh:
            for number, data in enumerate(fh, start=1):
                try:
                    line = data.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    problem = RowProblem(
                        "<row>", "invalid_utf8", f"byte {exc.start} of the line is not valid UTF-8"
                    )
                    yield f"{path}:{number}", None, problem
                    continue
                if line.strip():
                    yield f"{path}:{number}", line, None
        return
    for chunk in plan_chunks(resolve_sources([path], key), 1 << 30, "prompts"):
        for raw in iter_chunk_rows(chunk):
            if raw.problem is not None:
                yield raw.location, None, raw.problem
            elif not isinstance(raw.value, dict):  # a bare string or list on its line is the prompt itself
                yield raw.location, raw.value, None
            elif raw.value.get("prompt") is None:
                detail = "each row needs 'prompt' (a string, a list of chat messages or of token ids)"
                yield raw.location, None, RowProblem("prompt", "missing_field", detail)
            else:
                yield raw.location, raw.value["prompt"], None


def _parse(value: Any, token_ids: bool) -> list:
    """Chat messages for a string or messages; a list of ids where `token_ids` allows them."""
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        if not token_ids:
            raise RowProblem(
                "prompt", "wrong_type", "token ids are not accepted here; give text or chat messages"
            )
        if min(value) < 0:
            raise RowProblem("prompt", "wrong_type", f"token ids must be >= 0, got {min(value)}")
        return value
    return parse_prompt(value)


def load_reg_prompts(data_cfg: DataConfig, tokenizer_path: str) -> list[list[int]]:
    """Templated prompt ids (generation prompt added, cut from the left to max_prompt_length), deduplicated.

    From data.reg_prompts_file (read by `read_prompts`; data.on_bad_rows=skip leaves its bad rows out), else
    the prompts of data.train_files.
    """
    templater = Templater.from_path(str(tokenizer_path), data_cfg.max_length, data_cfg.max_prompt_length)
    if data_cfg.reg_prompts_file:
        skip = data_cfg.on_bad_rows == "skip"
        messages = read_prompts(
            data_cfg.reg_prompts_file, "data.reg_prompts_file", dedupe=True, skip_bad=skip
        )
    else:
        messages = _train_prompts(data_cfg)
    out: list[list[int]] = []
    for start in range(0, len(messages), _BATCH):
        out.extend(templater.encode_prompts(messages[start : start + _BATCH]))
    if not out:
        raise DataError("data.train_files: no usable regularization prompts")
    return out


def _train_prompts(data_cfg: DataConfig) -> list[list[dict[str, str]]]:
    """The distinct prompts of the training rows (bad rows are reported by prepare_preference_data)."""
    from spo_ray.data.processing import iter_examples

    seen: set[str] = set()
    prompts = []
    for chunk in plan_chunks(config_sources(data_cfg)[0], 1 << 30, "reg"):
        for _, item in iter_examples(iter_chunk_rows(chunk), data_cfg.format):
            if isinstance(item, RowProblem):
                continue
            identity = json.dumps(item.prompt, sort_keys=True)
            if identity not in seen:
                seen.add(identity)
                prompts.append(item.prompt)
    return prompts
