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


def test_rank0s_queued_syncs_keep_the_lag_of_a_waiting_sync_and_never_send_a_later_weight(
    pool, tiny_model_dir
):
    """rollout.async_sync on rank 0: each sync is copied and queued by a thread while the next step computes, and
    the next request queues behind it, so with overlap every batch lags exactly 1 (max_policy_lag=1: none is
    thrown away) and the weights a version carries are those of its step, not the ones the optimizer made next."""
    import torch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pool.sync_weights(state_dict_for_sync(model), 0)
    cfg = RolloutConfig(prompts_per_step=2, max_tokens=4, overlap=True, max_policy_lag=1, async_sync=True)
    sampler = OnlineSampler(pool, PROMPTS, cfg, rank=0, seed=0)
    snapshots = {}
    for step in range(4):
        samples, _, lag = sampler.get(step)
        assert lag == (1 if step else 0) and {s.policy_version for s in samples} == {max(step - 1, 0)}
        sampler.settle()  # what train_step does before optimizer.step()
        with torch.no_grad():  # the optimizer step: every weight moves
            for param in model.parameters():
                param.add_(0.01 * (step + 1))
        snapshots[step] = {name: t.clone() for name, t in model.state_dict().items()}
        sampler.sync(model, step + 1)  # the loop's version after this step; a thread copies and queues it
    sampler.finish()
    assert sampler.stale_resamples == 0 and pool.policy_version == 4
    assert sampler.last_sync["version"] == 4 and sampler.last_sync["bytes"] > 0
    from spo_ray.rollout.checks import logprob_gap

    served = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    served.load_state_dict(snapshots[3])
    later = [s for group in pool.generate(PROMPTS, n=2, max_tokens=6) for s in group]
    assert {s.policy_version for s in later} == {4} and logprob_gap(served, later) < 1e-3
