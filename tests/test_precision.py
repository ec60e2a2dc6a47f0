"""Mixed precision on the real path: float32 master weights under a bf16 model, float32 loss math under autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from spo_ray.config import LoraConfig, ModelConfig, TrainConfig
from spo_ray.data import collate_preference_batch
from spo_ray.losses import LossParams, get_loss, kl_per_position
from spo_ray.models.loading import load_policy_and_reference
from spo_ray.training.context import StepContext
from spo_ray.training.optim import build_optimizer
from spo_ray.training.samples import SampleBatch
from spo_ray.training.step import compute_step
from spo_ray.training.terms import preference_terms


def _rows(tokenizer, responses_per_prompt: list[list[str]]) -> dict:
    prompts = ["Why does the river move?", "Tell me about fresh bread", "Name a color"]
    rows = {"prompt_ids": [], "response_ids": [], "ranking": [], "example_id": []}
    for i, answers in enumerate(responses_per_prompt):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompts[i]}], tokenize=False, add_generation_prompt=True
        )
        rows["prompt_ids"].append(np.array(tokenizer(text)["input_ids"]))
        rows["response_ids"].append([np.array(tokenizer(a + "<|im_end|>")["input_ids"]) for a in answers])
        rows["ranking"].append(np.arange(len(answers)))
        rows["example_id"].append(i)
    rows["response_ids"] = np.array(rows["response_ids"], dtype=object)
    return rows


RESPONSES = [
    ["The river moves because water runs downhill.", "No."],
    ["Fresh bread is a good reason to wake up early.", "Bread."],
    ["Blue, like the sky at noon.", "Green is a color too, I think."],
]


def _context(policy, reference, reference_mode, loss_name: str, compute_dtype, kl_coef: float = 0.0):
    return StepContext(
        policy=policy,
        reference=reference,
        reference_mode=reference_mode,
        spec=get_loss(loss_name),
        params=LossParams(alpha=1.0, beta=0.1),
        kl_coef=kl_coef,
        kl_estimator="token",
        importance_clip=0.0,
        compute_dtype=compute_dtype,
    )


def _train(tiny_model_dir, model_cfg: ModelConfig, mixed: bool, steps: int, lr: float):
    """Load as the worker does, take `steps` AdamW steps of SPO + global KL; return (start, end) weights."""
    torch.manual_seed(0)
    policy, reference, mode = load_policy_and_reference(
        model_cfg, str(tiny_model_dir), str(tiny_model_dir), mixed_precision=mixed
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = collate_preference_batch(_rows(tokenizer, RESPONSES), tokenizer.pad_token_id)
    train_cfg = TrainConfig(lr=lr, warmup_steps=0, schedule="constant", max_steps=steps)
    optimizer, scheduler = build_optimizer(policy, train_cfg)
    ctx = _context(policy, reference, mode, "spo", torch.bfloat16 if mixed else None)
    start = {n: p.detach().double().clone() for n, p in policy.named_parameters()}
    for _ in range(steps):
        compute_step(ctx, batch, None).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return policy, reference, start, {n: p.detach().double() for n, p in policy.named_parameters()}


def test_bf16_model_at_a_tiny_learning_rate_moves_the_weights_as_much_as_fp32(tiny_model_dir):
    """At lr 5e-7, bf16(w − 5e-7·g) == w for |w| ≳ 1e-4: without float32 master weights nothing trains."""
    _, _, fp32_start, fp32_end = _train(tiny_model_dir, ModelConfig(), mixed=False, steps=4, lr=5e-7)
    policy, reference, bf16_start, bf16_end = _train(
        tiny_model_dir, ModelConfig(dtype="bfloat16"), mixed=True, steps=4, lr=5e-7
    )
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # master weights
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}  # frozen copy keeps model.dtype
    fp32_delta = torch.cat([(fp32_end[n] - fp32_start[n]).flatten() for n in fp32_start])
    bf16_delta = torch.cat([(bf16_end[n] - bf16_start[n]).flatten() for n in bf16_start])
    assert fp32_delta.norm() > 0
    assert float(bf16_delta.norm() / fp32_delta.norm()) == pytest.approx(1.0, abs=0.05)
    cosine = float(bf16_delta @ fp32_delta / (bf16_delta.norm() * fp32_delta.norm()))
    assert cosine > 0.95  # the same update, up to bf16 rounding of the gradients


def test_lora_over_a_bf16_base_trains_float32_adapters_under_autocast(tiny_model_dir):
    model_cfg = ModelConfig(dtype="bfloat16", lora=LoraConfig(r=4))
    policy, reference, start, end = _train(tiny_model_dir, model_cfg, mixed=True, steps=2, lr=5e-7)
    assert reference is None  # the reference is the base, with the adapter disabled
    trainable = {n: p.dtype for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    frozen = {p.dtype for p in policy.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    moved = [n for n in trainable if not torch.equal(start[n], end[n])]
    assert moved, "no adapter weight moved at lr 5e-7"


@pytest.fixture(scope="module")
def float32_models(tiny_model_dir):
    torch.manual_seed(1)
    policy, reference, _ = load_policy_and_reference(ModelConfig(), str(tiny_model_dir), str(tiny_model_dir))
    with torch.no_grad():  # make the policy differ from the reference
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return policy, reference, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("loss_name", ["spo", "dpo", "ipo", "simpo", "tdpo"])
def test_bf16_autocast_loss_is_within_one_percent_of_float32(float32_models, loss_name):
    policy, reference, tokenizer = float32_models
    batch = collate_preference_batch(_rows(tokenizer, RESPONSES), tokenizer.pad_token_id)
    prompt = batch.input_ids[0, : int(batch.prompt_lengths[0])].tolist()
    samples = SampleBatch.from_samples(  # two online samples for the global KL term
        [
            type("S", (), {"prompt_token_ids": prompt, "token_ids": [5, 9, 13, 2], "logprobs": [-1.0] * 4}),
            type("S", (), {"prompt_token_ids": prompt[1:], "token_ids": [7, 7], "logprobs": [-2.0] * 2}),
        ],
        tokenizer.pad_token_id,
        torch.device("cpu"),
    )
    full = compute_step(_context(policy, reference, None, loss_name, None, 0.5), batch, samples)
    mixed = compute_step(_context(policy, reference, None, loss_name, torch.bfloat16, 0.5), batch, samples)
    assert mixed.loss.dtype == torch.float32
    assert mixed.loss.item() == pytest.approx(full.loss.item(), rel=1e-2)
    assert mixed.metrics["kl_token"] == pytest.approx(full.metrics["kl_token"], rel=1e-2)


def test_response_lengths_stay_exact_past_256_tokens_under_autocast(float32_models):
    """bfloat16 holds integers exactly only up to 256: SimPO's lengths must not pass through it."""
    policy, reference, tokenizer = float32_models
    rows = _rows(tokenizer, RESPONSES[:1])
    long_ids = np.array(tokenizer(" ".join(["river"] * 400))["input_ids"])
    rows["response_ids"][0] = [long_ids[:256], long_ids[:290]]  # 257 and 291 tokens with eos
    rows["response_ids"][0] = [np.r_[ids, tokenizer.eos_token_id] for ids in rows["response_ids"][0]]
    batch = collate_preference_batch(rows, tokenizer.pad_token_id)
    ctx = _context(policy, reference, None, "simpo", torch.bfloat16)
    with torch.no_grad():
        terms = preference_terms(ctx, batch)
    assert terms.lengths.dtype == torch.float32
    assert terms.lengths.tolist() == [[257.0, 291.0]]


def test_per_token_kl_sums_the_vocabulary_in_float32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    policy_logits = 3 * torch.randn(2, 64, 1024, generator=gen)
    ref_logits = 3 * torch.randn(2, 64, 1024, generator=gen)
    exact = kl_per_position(policy_logits.double(), ref_logits.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = kl_per_position(policy_logits, ref_logits)
    assert under_autocast.dtype == torch.float32
    assert float(((under_autocast - exact).abs() / exact).max()) < 1e-5  # bf16 einsum: ~7e-3
