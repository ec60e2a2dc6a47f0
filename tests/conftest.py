"""Shared fixtures: one tiny model and one Ray runtime per test session (Ray start-up is costly)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dummy S3 keys for tests/test_storage_uri.py's local S3 server (moto): set before the session's Ray runtime
# starts so that its workers inherit them and sign their uploads (they never reach a real AWS endpoint)
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny Llama + tokenizer, built from its seed (no hub)."""
    from spo_ray.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def float64_pair(tiny_model_dir):
    """`build(noise)` -> (policy, frozen reference): the tiny model twice in float64, the policy moved off the
    reference by noise·N(0, 1) on every weight (seed 0), for exact value and gradient checks."""
    import torch
    from transformers import AutoModelForCausalLM

    def build(noise: float):
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(noise * torch.randn_like(param))
        return policy, reference

    return build


@pytest.fixture(scope="session")
def ray_runtime():
    """A local Ray runtime shared by the tests that need one."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    yield ray
    ray.shutdown()
