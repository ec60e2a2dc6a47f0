"""Precomputed reference log-probs: score every response with the frozen reference once, before training.

For the offline reference-based losses (dpo, ipo, cdpo, rdpo) this removes the reference forward from
every step, and the workers load no reference copy unless the online KL regularizer needs one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

REF_COLUMN = "ref_logps"


class ReferenceScorer:
    """Ray Data callable: adds `ref_logps` (one float per response) to tokenized preference rows."""

    def __init__(self, model_dir: str, pad_token_id: int, dtype: str):
        import torch

        from spo_ray.models.loading import load_causal_lm

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        self.model = load_causal_lm(model_dir, dtype).eval()
        self.pad_token_id = pad_token_id

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from spo_ray.data import collate_preference_batch, response_logps

        batch = collate_preference_batch(rows, self.pad_token_id)
        with torch.no_grad():
            logits = self.model(**batch.model_inputs()).logits
            logps = response_logps(logits, batch).view(-1, batch.num_responses).double().numpy()  # [B, n]
        rows[REF_COLUMN] = np.array(list(logps), dtype=object) if logps.ndim == 2 else logps
        return rows


def add_reference_logps(
    prepared, reference_dir: str, dtype: str, out_dir: str | os.PathLike, batch_size: int = 32
):
    """Score `prepared.train` once with the reference, write it to Parquet, and return a copy reading it back."""
    import ray.data

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    scored = prepared.train.map_batches(
        ReferenceScorer,
        fn_constructor_args=(reference_dir, prepared.pad_token_id, dtype),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=1,
    )
    scored.write_parquet(str(out))
    return dataclasses.replace(prepared, train=ray.data.read_parquet(str(out)))
