"""Precomputed log-probs: score every response with a frozen model once, before training.

For the offline reference-based losses (dpo, ipo, cdpo, rdpo) this removes the reference forward from
every step, and the workers load no reference copy unless the online KL regularizer needs one. SPPO
scores its rows with the round's start policy π_t the same way (column `prev_logps`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REF_COLUMN = "ref_logps"


class ReferenceScorer:
    """Ray Data callable: adds `column` (one log-prob per response) to tokenized preference rows."""

    def __init__(
        self, model_dir: str, pad_token_id: int, dtype: str, column: str = REF_COLUMN, threads: int = 0
    ):
        import torch

        from spo_ray.models.loading import load_causal_lm

        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // 2))
        self.device = (
            "cuda" if torch.cuda.is_available() else "cpu"
        )  # an actor started with num_gpus sees one
        self.model = load_causal_lm(model_dir, dtype).to(self.device).eval()
        self.pad_token_id = pad_token_id
        self.column = column

    def __call__(self, table):
        """A pyarrow batch in, the same batch plus `column` out: the token columns are never converted
        back from numpy (ragged nested lists fall back to pickled objects that Parquet readers refuse)."""
        import pyarrow as pa
        import torch

        from spo_ray.data import collate_preference_batch, response_logps

        names = ("prompt_ids", "response_ids", "ranking", "example_id")
        rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in names}
        batch = collate_preference_batch(rows, self.pad_token_id).to(self.device)
        with torch.no_grad():
            logits = self.model(**batch.model_inputs()).logits
            logps = response_logps(logits, batch).view(-1, batch.num_responses).double()  # [B, n]
        return table.append_column(self.column, pa.array(logps.cpu().tolist(), type=pa.list_(pa.float64())))


def add_reference_logps(
    prepared,
    reference_dir: str,
    dtype: str,
    out_dir: str | os.PathLike,
    batch_size: int = 32,
    column: str = REF_COLUMN,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    use_gpu: bool = False,
):
    """Score `prepared.train` once with `reference_dir` into `column` with `actors` Ray Data actors (one GPU
    each with use_gpu), store it as one array [num_train, n] by example id, and return a copy reading it."""
    import numpy as np

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    scored = (
        prepared.train_rows.blocks(batch_size)
        .map_batches(
            ReferenceScorer,
            fn_constructor_args=(
                reference_dir,
                prepared.pad_token_id,
                dtype,
                column,
                max(1, int(cpus_per_actor)),
            ),
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=actors,
            num_cpus=cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
        )
        .select_columns(["example_id", column])
    )
    values = np.full((prepared.num_train, prepared.num_responses), np.nan)  # [num_train, n]
    for batch in scored.iter_batches(batch_format="numpy", batch_size=4096):
        values[batch["example_id"]] = np.stack(batch[column])
    if np.isnan(values).any():
        raise RuntimeError(f"{column}: {int(np.isnan(values).any(axis=1).sum())} examples were not scored")
    path = out / f"{column}.npy"
    np.save(out / f"{column}.tmp.npy", values)
    os.replace(out / f"{column}.tmp.npy", path)
    return prepared.with_column(column, str(path))
