"""Prompt files: the global-KL regularizer's prompts (data.reg_prompts_file, else the training prompts) and plain prompt lists."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spo_ray.data.schema import RowProblem, parse_prompt
from spo_ray.data.sources import Chunk, config_sources, iter_chunk_rows, plan_chunks, resolve_sources
from spo_ray.data.templating import Templater
from spo_ray.errors import DataError, UserError

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


def _reg_prompt(value: object) -> list[dict[str, str]]:
    if not isinstance(value, dict):
        raise RowProblem("<row>", "wrong_type", "expected an object with a 'prompt' field")
    if value.get("prompt") is None:
        raise RowProblem(
            "prompt", "missing_field", "each line needs 'prompt' (a string or a list of messages)"
        )
    return parse_prompt(value["prompt"])


def _prompt_messages(
    chunks: list[Chunk], fmt: str, from_reg_file: bool, skip_bad: bool, key: str = "data.reg_prompts_file"
):
    from spo_ray.data.processing import iter_examples

    for chunk in chunks:
        if from_reg_file:
            rows = iter_chunk_rows(chunk)
            for raw in rows:
                try:
                    if raw.problem is not None:
                        raise raw.problem
                    yield _reg_prompt(raw.value)
                except RowProblem as problem:
                    if not skip_bad:
                        raise DataError(f"{raw.location}: {problem} ({key})") from None
        else:
            for _, item in iter_examples(iter_chunk_rows(chunk), fmt):
                if not isinstance(item, RowProblem):  # bad rows are reported by prepare_preference_data
                    yield item.prompt


def read_prompt_file(path: str, key: str) -> list[list[dict[str, str]]]:
    """Prompt messages from a JSONL file of {"prompt": str or messages}, deduplicated, in file order;
    a bad row raises DataError naming file:line and the config `key` that named the file."""
    chunks = plan_chunks(resolve_sources([path], key), 1 << 30, "prompts")
    seen: set[str] = set()
    out = []
    for messages in _prompt_messages(chunks, "auto", from_reg_file=True, skip_bad=False, key=key):
        text = json.dumps(messages, sort_keys=True)
        if text not in seen:
            seen.add(text)
            out.append(messages)
    if not out:
        raise DataError(f"{path}: no prompts ({key})")
    return out


def load_reg_prompts(
    data_cfg: DataConfig, tokenizer_path: str, max_prompts: int | None = None
) -> list[list[int]]:
    """Templated prompt ids (generation prompt added, cut from the left to max_prompt_length), deduplicated.

    From data.reg_prompts_file (JSONL, "prompt": str or messages), else the prompts of data.train_files.
    """
    templater = Templater.from_path(str(tokenizer_path), data_cfg.max_length, data_cfg.max_prompt_length)
    from_file = bool(data_cfg.reg_prompts_file)
    if from_file:
        sources = resolve_sources([data_cfg.reg_prompts_file], "data.reg_prompts_file")
    else:
        sources = config_sources(data_cfg)[0]
    chunks = plan_chunks(sources, 1 << 30, "reg")
    seen: set[str] = set()
    batch: list[list[dict[str, str]]] = []
    out: list[list[int]] = []

    def flush() -> None:
        out.extend(templater.encode_prompts(batch))
        batch.clear()

    for messages in _prompt_messages(chunks, data_cfg.format, from_file, data_cfg.on_bad_rows == "skip"):
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        batch.append(messages)
        if len(batch) >= _BATCH:
            flush()
        if max_prompts is not None and len(seen) >= max_prompts:
            break
    flush()
    if not out:
        raise DataError(
            f"{data_cfg.reg_prompts_file or 'data.train_files'}: no usable regularization prompts"
        )
    return out


def read_prompts(path: str | os.PathLike) -> list[Any]:
    """Prompts from .jsonl (objects with 'prompt': text, chat messages or token ids) or text, one per line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompts file '{path}' does not exist (cwd: {os.getcwd()})")
    prompts: list[Any] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix not in (".jsonl", ".json"):
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else row
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise UserError(f'{path}:{number}: no \'prompt\' field (expected {{"prompt": "..."}})')
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"prompts file '{path}' holds no prompts")
    return prompts
