"""Driver side of the data pipeline: plan chunks, tokenize them in Ray Data, apply the bad-row policy."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from spo_ray.data import cache
from spo_ray.data.mixture import MIXTURE_FILE, check_columns, column_maps, mixture_selection
from spo_ray.data.permutation import derive_key
from spo_ray.data.prepared import PreparedData
from spo_ray.data.processing import ChunkResult, is_fatal, iter_examples, process_chunk
from spo_ray.data.schema import Example
from spo_ray.data.sources import Chunk, Source, config_sources, iter_chunk_rows, plan_chunks, unread_files
from spo_ray.data.store import RowIndex
from spo_ray.data.templating import load_template_tokenizer
from spo_ray.errors import DataError

if TYPE_CHECKING:
    from spo_ray.config import DataConfig

ROWS_PER_CHUNK = 4096
PEEK_ROWS = 1000  # rows read to learn the number of responses per example


def _rowless_files(sources: list[Source], path_of: dict[int, str], results: list[ChunkResult]) -> list[str]:
    """Paths of the sources no row was read from (empty, blank lines only, a CSV header only, `[]`)."""
    read = Counter()
    for result in results:
        read[path_of[result.index]] += result.read
    return [source.path for source in sources if read[source.path] == 0]


def _no_rows_error(key: str, paths: list[str]) -> DataError:
    def why(path: str) -> str:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return f"{path} is empty (0 bytes)"
        return f"{path} holds no rows (only blank lines, a CSV header or an empty list)"

    return DataError(
        f"{key}: no rows to read: {'; '.join(why(p) for p in paths[:5])}; "
        f"give files with preference rows (e.g. one JSON object per line) or remove these from {key}"
    )


def peek_num_responses(chunks: list[Chunk], fmt: str, maps: dict | None = None) -> int:
    """Responses per example of the first good row (2 when the first PEEK_ROWS rows have none)."""
    seen = 0
    for chunk in chunks:
        columns = (maps or {}).get(str(chunk.group), ("", {}))[1]
        for _, item in iter_examples(iter_chunk_rows(chunk), fmt, columns):
            if isinstance(item, Example):
                return len(item.responses)
            seen += 1
            if seen >= PEEK_ROWS:
                return 2
    return 2


def _run_chunks(batch: dict[str, np.ndarray], settings: dict[str, Any]) -> dict[str, np.ndarray]:
    results = [process_chunk(Chunk.from_json(text), settings).to_json() for text in batch["chunk"]]
    return {"result": np.array(results, dtype=object)}


def _process_all(chunks: list[Chunk], settings: dict[str, Any]) -> list[ChunkResult]:
    """Process every chunk as one Ray Data map_batches; only the small per-chunk results come back."""
    import ray.data

    if not chunks:
        return []
    items = [{"chunk": chunk.to_json()} for chunk in chunks]
    # Small inputs need few worker processes (each loads the tokenizer once); large ones get them all.
    rows = sum(chunk.rows if chunk.rows >= 0 else ROWS_PER_CHUNK for chunk in chunks)
    tasks = max(1, min(len(chunks), -(-rows // ROWS_PER_CHUNK)))
    plan = ray.data.from_items(items, override_num_blocks=len(items))
    done = plan.map_batches(
        _run_chunks,
        batch_size=1,
        fn_kwargs={"settings": settings},
        compute=ray.data.TaskPoolStrategy(size=tasks),
    )
    results = [ChunkResult.from_json(row["result"]) for row in done.iter_rows()]
    return sorted(results, key=lambda r: r.index)


def _merge_quarantine(results: list[ChunkResult], out_dir: str) -> str | None:
    parts = [r.quarantine for r in results if r.quarantine]
    if not parts:
        return None
    path = os.path.join(out_dir, "quarantine.jsonl")
    with open(path, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                shutil.copyfileobj(fh, out)
    shutil.rmtree(os.path.dirname(parts[0]), ignore_errors=True)
    for r in results:
        r.quarantine = None
    return path


def _row_index(results: list[ChunkResult], n_eval: int, key: int, held_out: bool) -> RowIndex | None:
    """The index over the parts of `results` (None when no row is good); with n_eval, one side of the split."""
    parts, starts, offset = [], [], 0
    for r in results:
        if r.part:
            parts.append(r.part)
            starts.append(offset)
        offset += r.good
    if not parts:
        return None
    num_rows = n_eval if held_out else offset - n_eval
    return RowIndex(tuple(parts), (*starts, offset), num_rows, n_eval, key, held_out)


def _tokenize(
    data_cfg: DataConfig, tokenizer_path: str, sources: tuple[list[Source], list[Source]], folder: str
) -> dict[str, Any]:
    """Plan, read and tokenize every chunk into `folder`; apply the bad-row policy; the cache manifest."""
    train_sources, eval_sources = sources
    train_chunks = plan_chunks(train_sources, ROWS_PER_CHUNK, "train")
    eval_chunks = plan_chunks(eval_sources, ROWS_PER_CHUNK, "eval", first_index=len(train_chunks))
    chunks = train_chunks + eval_chunks
    maps = column_maps(data_cfg)
    check_columns(chunks, maps)
    settings = {
        **_settings(data_cfg),
        "tokenizer_path": str(tokenizer_path),
        "num_responses": peek_num_responses(chunks, data_cfg.format, maps),
        "out_dir": folder,
    }
    results = _process_all(chunks, settings)
    fatal = sorted((p for r in results for p in r.problems if is_fatal(p, settings)), key=lambda p: p.order)
    if fatal:
        first = fatal[0]
        key = "data.on_long_rows" if first.reason == "too_long" else "data.on_bad_rows"
        what = "skip to quarantine them and go on" + (", or truncate" if first.reason == "too_long" else "")
        raise DataError(
            f"{first}\n({key}=error stops at the first such row; `spo-ray data validate PATH` lists all of "
            f"them, or set {key}={what})"
        )
    path_of = {chunk.index: chunk.path for chunk in chunks}
    empty_train = _rowless_files(train_sources, path_of, results)
    empty_eval = _rowless_files(eval_sources, path_of, results)
    if len(empty_train) == len(train_sources):
        raise _no_rows_error("data.train_files", empty_train)
    if eval_sources and len(empty_eval) == len(eval_sources):
        raise _no_rows_error("data.eval_files", empty_eval)
    quarantine = _merge_quarantine(results, folder)
    for r in results:
        r.part = os.path.relpath(r.part, folder) if r.part else None
    return {
        "mixture": _mixture(data_cfg, chunks, results, folder),
        "num_responses": settings["num_responses"],
        "results": [r.to_json() for r in results],
        "empty_files": empty_train + empty_eval,
        "quarantine": bool(quarantine),
    }


def _mixture(
    data_cfg: DataConfig, chunks: list[Chunk], results: list[ChunkResult], folder: str
) -> list[dict]:
    """With data.sources: choose the mixture's rows, write them to MIXTURE_FILE; per source what was taken."""
    if not data_cfg.sources:
        return []
    group_of = {chunk.index: chunk.group for chunk in chunks}
    rows_by_group: list[list[np.ndarray]] = [[] for _ in data_cfg.sources]
    offset = 0
    for r in results:
        if r.role == "train":
            rows_by_group[group_of[r.index]].append(np.arange(offset, offset + r.good))
            offset += r.good
    rows = [np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in rows_by_group]
    weights = [entry.weight for entry in data_cfg.sources]
    selection, taken = mixture_selection(rows, weights, data_cfg.mixture_size, data_cfg.shuffle_seed)
    np.save(os.path.join(folder, MIXTURE_FILE), selection)
    return [{"weight": w, "rows": len(r), "taken": t} for w, r, t in zip(weights, rows, taken)]


def _settings(data_cfg: DataConfig) -> dict[str, Any]:
    """The data settings that change what tokenization writes or which rows train (part of the cache key)."""
    return {
        "max_length": data_cfg.max_length,
        "max_prompt_length": data_cfg.max_prompt_length,
        "format": data_cfg.format,
        "on_bad_rows": data_cfg.on_bad_rows,
        "on_long_rows": data_cfg.on_long_rows,
        "columns": column_maps(data_cfg),
        "mixture": [entry.weight for entry in data_cfg.sources],
        "mixture_size": data_cfg.mixture_size,
        "mixture_seed": data_cfg.shuffle_seed if data_cfg.sources else None,
        **({"dimension": data_cfg.dimension} if data_cfg.dimension else {}),  # old cache keys stay valid
    }


def prepare_preference_data(data_cfg: DataConfig, tokenizer_path: str, output_dir: str) -> PreparedData:
    """Read, normalize, template and tokenize the preference data into streaming Ray datasets.

    Bad rows raise DataError (file:line: field: reason) with on_bad_rows=error; with skip they go to
    OUTPUT/quarantine.jsonl and `bad_rows` counts them by reason."""
    tokenizer = load_template_tokenizer(str(tokenizer_path))
    sources = config_sources(data_cfg)
    root = os.path.join(output_dir, "data")
    settings = _settings(data_cfg)
    key, inputs = cache.cache_key(sources[0] + sources[1], str(tokenizer_path), settings)
    manifest = cache.read_manifest(root, key)
    reused = manifest is not None
    if manifest is None:
        with cache.building(root, key) as folder:
            manifest = {"inputs": inputs, **_tokenize(data_cfg, tokenizer_path, sources, folder)}
            cache.write_manifest(folder, manifest)
    cache_dir = os.path.join(root, key)
    results = [ChunkResult.from_json(text) for text in manifest["results"]]
    for r in results:
        r.part = os.path.join(cache_dir, r.part) if r.part else None
    bad = sum((r.bad for r in results), Counter())
    quarantine = None
    if manifest["quarantine"]:
        quarantine = os.path.join(output_dir, "quarantine.jsonl")
        shutil.copyfile(os.path.join(cache_dir, "quarantine.jsonl"), quarantine)
    train_results = [r for r in results if r.role == "train"]
    eval_results = [r for r in results if r.role == "eval"]
    n_all = sum(r.good for r in train_results)
    n_eval_files = sum(r.good for r in eval_results)
    n_split = 0
    if data_cfg.eval_fraction > 0 and not sources[1]:
        n_split = max(1, round(data_cfg.eval_fraction * n_all)) if n_all > 1 else 0
    num_train = n_all - n_split
    if num_train < 1:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or "no rows"
        raise DataError(
            f"data.train_files: no usable training rows ({reasons}); see {quarantine or 'the input files'}"
        )
    split_key = derive_key(data_cfg.shuffle_seed, "eval_split")
    train_rows = _row_index(train_results, n_split, split_key, held_out=False)
    mixture = manifest.get("mixture") or []
    if mixture:
        num_train = sum(m["taken"] for m in mixture)
        train_rows = replace(train_rows, num_rows=num_train, selection=os.path.join(cache_dir, MIXTURE_FILE))
    if n_split:
        eval_rows = _row_index(train_results, n_split, split_key, held_out=True)
    else:
        eval_rows = _row_index(eval_results, 0, 0, held_out=False)
    prepared = PreparedData(
        train=train_rows.dataset(),
        eval=eval_rows.dataset() if eval_rows else None,
        train_rows=train_rows,
        eval_rows=eval_rows,
        num_train=num_train,
        num_responses=manifest["num_responses"],
        bad_rows=dict(sorted(bad.items())),
        quarantine_path=quarantine,
        num_eval=n_split or n_eval_files,
        rows_read=sum(r.read for r in results),
        prompts_truncated=sum(r.truncated for r in results),
        responses_truncated=sum(r.responses_truncated for r in results),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        empty_files=manifest["empty_files"],
        unread_files=unread_files(
            data_cfg.train_files
            + data_cfg.eval_files
            + [f for entry in data_cfg.sources for f in entry.files]
        ),
        cache_dir=cache_dir,
        cache_reused=reused,
        mixture=mixture,
    )
    with open(os.path.join(root, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(prepared.summary(), fh, indent=1)
    return prepared
