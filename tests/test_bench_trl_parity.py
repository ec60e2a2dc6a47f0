"""The benchmark compares like with like: spo_ray's DPO loss is TRL's DPO loss on the same batch."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is the benchmark's comparison target: pip install -e '.[bench]'")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_spo_ray_dpo_loss_equals_trl_dpo_loss_on_a_fixed_batch(tiny_model_dir, tmp_path):
    from bench_train import dpo_parity
    from common import conversational_pairs

    rows = conversational_pairs(8, seed=0, prompt_words=(4, 12), response_words=(3, 12))
    result = dpo_parity(tiny_model_dir, rows, batch=8, max_length=128, work_dir=tmp_path)
    assert abs(result["trl_loss"] - math.log(2)) > 1e-3  # policy and reference differ: not the trivial loss
    assert abs(result["spo_ray_loss"] - result["trl_loss"]) < 1e-5
    assert abs(result["spo_ray_loss_packed"] - result["trl_loss"]) < 1e-5
