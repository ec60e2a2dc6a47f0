"""Precomputed log-probs: a pool of Ray Data actors scores exactly what one actor does, and every rank reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spo_ray.config import DataConfig
from spo_ray.data import prepare_preference_data, train_shards
from spo_ray.training.reference import ReferenceScorer, add_reference_logps


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir, ray_runtime):
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    tmp = tmp_path_factory.mktemp("scoring")
    rows = [
        {"prompt": f"question {i}?", "chosen": f"yes {i}" * (1 + i % 3), "rejected": f"no {i}"}
        for i in range(13)
    ]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train_files=[str(tmp / "pairs.jsonl")], eval_fraction=0.2)  # ids renumbered by the split
    return prepare_preference_data(cfg, str(tiny_model_dir), str(tmp / "out")), tmp


def test_two_scoring_actors_give_the_one_actor_log_probs_and_every_rank_reads_its_rows(
    prepared, tiny_model_dir
):
    prepared, tmp = prepared
    two = add_reference_logps(prepared, str(tiny_model_dir), "float32", tmp / "two", batch_size=3, actors=2)
    pooled = np.load(dict(two.train_rows.columns)["ref_logps"])
    # what one actor computes: the same scorer over the same batches of 3 examples, in order
    scorer = ReferenceScorer(str(tiny_model_dir), prepared.pad_token_id, "float32", threads=1)
    single = np.concatenate(
        [
            np.stack(
                scorer(prepared.train_rows.read(np.arange(f, min(f + 3, prepared.num_train))))
                .column("ref_logps")
                .to_pylist()
            )
            for f in range(0, prepared.num_train, 3)
        ]
    )
    assert single.shape == (prepared.num_train, 2) and np.isfinite(single).all()
    assert np.array_equal(single, pooled)
    assert len(np.unique(single[:, 0])) > 1  # real per-example scores, not one constant
    shards = train_shards(two, world_size=2, seed=0, epoch=0)
    seen = 0
    for shard in shards.values():
        for batch in shard.iter_batches(batch_size=4, batch_format="numpy"):
            assert np.array_equal(np.stack(batch["ref_logps"]), single[batch["example_id"]])
            seen += len(batch["example_id"])
    assert seen == prepared.num_train - prepared.num_train % 2
