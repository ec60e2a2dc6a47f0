"""rollout.max_policy_lag holds on every rank: a rank that asks before rank 0's sync lands waits for it."""

from __future__ import annotations

import threading
import time

import pytest
from transformers import AutoModelForCausalLM

from spo_ray.config import RolloutConfig
from spo_ray.rollout import RolloutError, RolloutPool, state_dict_for_sync
from spo_ray.training.online import OnlineSampler

pytestmark = pytest.mark.slow

PROMPTS = [[1, 280, 201, 364, 295], [1, 300, 201, 295]]


@pytest.fixture(scope="module")
def pool(ray_runtime, tiny_model_dir):
    rollout = RolloutPool(tiny_model_dir, backend="hf", seed=0, timeout_s=60)
    yield rollout
    rollout.shutdown()


def _sampler(pool, **settings) -> OnlineSampler:
    cfg = RolloutConfig(prompts_per_step=2, max_tokens=4, overlap=False, max_policy_lag=0, **settings)
    return OnlineSampler(pool, PROMPTS, cfg, rank=1, seed=0)


def test_a_rank_ahead_of_the_sync_waits_for_the_version_instead_of_training_on_stale_samples(
    pool, tiny_model_dir
):
    weights = state_dict_for_sync(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    pool.sync_weights(weights, 0)
    sampler = _sampler(pool)
    # Rank 1 reaches step 1 while rank 0 is still syncing version 1 (it lands 1.5 s later).
    late_sync = threading.Timer(1.5, pool.sync_weights, args=(weights, 1))
    late_sync.start()
    started = time.perf_counter()
    samples, waited, lag = sampler.get(1)
    late_sync.join()
    assert lag == 0 and {s.policy_version for s in samples} == {1}
    assert sampler.stale_resamples >= 1  # the stale batch was thrown away, and counted
    assert waited >= 1.0 and time.perf_counter() - started >= 1.0


def test_a_version_that_never_comes_is_a_clear_error_not_a_stale_batch(pool, tiny_model_dir):
    weights = state_dict_for_sync(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    pool.sync_weights(weights, 3)
    sampler = _sampler(pool, timeout_s=2.0)
    with pytest.raises(RolloutError, match=r"rank 1, step 5: .*serve version 3.*needs samples of version 5"):
        sampler.get(5)
