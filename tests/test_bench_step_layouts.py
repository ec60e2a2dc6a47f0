"""The trainer step's fast forward layouts compute the same thing as the plain padded forward.

`spo_ray/training/layouts.py` runs each prompt once with its responses behind a 4-D mask (shared-prompt
layout) and applies the LM head only where a response token is predicted; these tests pin that the
per-sequence log-probs, every loss's value and the gradients match the padded batch's full-logits
forward (bench/RESULTS.md measures the speed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spo_ray.data import collate_preference_batch, response_logps
from spo_ray.losses import LossParams, get_loss
from spo_ray.training import layouts, terms
from spo_ray.training.context import StepContext, response_token_logps
from spo_ray.training.step import compute_step

PROMPTS = ["Why does the river move?", "Tell me", "Name a color."]
RESPONSES = [
    ["The river moves.", "No.", "It flows to the sea"],
    ["Bread.", "A good reason", "x"],
    ["Red.", "Blue.", "A"],
]


def rows_for(tokenizer, n):
    def ids(text):
        return np.array(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompts = [
        ids(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
        )
        for p in PROMPTS
    ]
    return {
        "prompt_ids": prompts,
        "response_ids": [[ids(r + tokenizer.eos_token) for r in rs[:n]] for rs in RESPONSES],
        "ranking": [list(range(n)) for _ in PROMPTS],
        "example_id": list(range(len(PROMPTS))),
    }


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def models(request, tiny_model_dir):
    torch.manual_seed(0)
    load = dict(dtype=torch.float64, attn_implementation=request.param)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **load)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **load).eval()
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return policy, reference, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("packing", [False, True])
def test_shared_prompt_layout_gives_the_padded_forwards_log_probs(models, packing):
    policy, _, tokenizer = models
    batch = collate_preference_batch(rows_for(tokenizer, 3), tokenizer.pad_token_id, packing=packing)
    padded = collate_preference_batch(rows_for(tokenizer, 3), tokenizer.pad_token_id)
    # eager attention takes its softmax in float32 even for float64 weights
    tolerance = 1e-10 if policy.config._attn_implementation == "sdpa" else 1e-6
    with torch.no_grad():
        expected = response_logps(policy(**padded.model_inputs()).logits, padded)
        for tokens in (layouts.response_tokens(policy, batch), layouts.batch_layout(batch)):
            logits = layouts.response_logits(policy, tokens)
            assert logits.shape == (int(batch.response_lengths.sum()), policy.config.vocab_size)
            got = layouts.per_sequence(response_token_logps(logits, tokens.labels), tokens)
            torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_the_shared_prompt_layout_holds_each_prompt_once(models):
    policy, _, tokenizer = models
    batch = collate_preference_batch(rows_for(tokenizer, 3), tokenizer.pad_token_id)
    tokens = layouts.response_tokens(policy, batch)
    real = int((tokens.model_inputs["position_ids"] > 0).sum()) + len(PROMPTS)  # one position 0 per row
    prompt = int(batch.prompt_lengths.view(-1, 3)[:, 0].sum())
    assert real == prompt + int(batch.response_lengths.sum())


@pytest.mark.parametrize(
    "name", ["spo", "spo_best_of_n", "spo_ranked", "dpo", "ipo", "rdpo", "simpo", "tdpo"]
)
def test_every_offline_loss_and_its_gradient_match_the_padded_layout(models, name, monkeypatch):
    policy, reference, tokenizer = models
    n = 2 if get_loss(name).kind == "pairwise" else 3
    batch = collate_preference_batch(rows_for(tokenizer, n), tokenizer.pad_token_id)
    ctx = StepContext(
        policy,
        reference,
        None,
        get_loss(name),
        LossParams(alpha=0.7, beta=0.3, epsilon=0.1),
        0.0,
        "token",
        0.0,
    )

    def loss_and_grad():
        policy.zero_grad()
        out = compute_step(ctx, batch, None)
        out.loss.backward()
        return out.loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters()])

    shared_loss, shared_grad = loss_and_grad()
    monkeypatch.setattr(terms, "response_tokens", lambda model, b: layouts.batch_layout(b))
    padded_loss, padded_grad = loss_and_grad()
    # Llama's RMSNorm computes in float32 even for float64 weights, so gradients agree to float32 precision
    assert shared_loss == pytest.approx(padded_loss, rel=1e-7)
    torch.testing.assert_close(shared_grad, padded_grad, rtol=1e-5, atol=1e-6)


def _tiny_mistral(tiny_model_dir, window: int):
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=window,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config).double().eval(), tokenizer


def test_a_sliding_window_shorter_than_the_sequences_falls_back_to_the_exact_padded_layout(tiny_model_dir):
    model, tokenizer = _tiny_mistral(tiny_model_dir, window=4)  # every sequence is longer than 4 tokens
    batch = collate_preference_batch(rows_for(tokenizer, 3), tokenizer.pad_token_id)
    assert layouts.shared_prompt_attention(model, batch) is None

    def logps(tokens):
        logits = layouts.response_logits(model, tokens)
        return layouts.per_sequence(response_token_logps(logits, tokens.labels), tokens)

    with torch.no_grad():
        expected = response_logps(model(**batch.model_inputs()).logits, batch)  # Mistral's own window mask
        torch.testing.assert_close(
            logps(layouts.response_tokens(model, batch)), expected, rtol=1e-10, atol=1e-10
        )
        # The 4-D mask would have dropped the window: the fallback is what keeps the log-probs right.
        shared = logps(layouts.shared_prompt_layout(batch, "sdpa", torch.float64))
    assert float((shared - expected).abs().max()) > 1e-3


def test_a_sliding_window_wider_than_every_sequence_keeps_the_shared_prompt_layout(tiny_model_dir):
    model, tokenizer = _tiny_mistral(tiny_model_dir, window=4096)
    batch = collate_preference_batch(rows_for(tokenizer, 3), tokenizer.pad_token_id)
    assert layouts.shared_prompt_attention(model, batch) == "sdpa"
    with torch.no_grad():
        expected = response_logps(model(**batch.model_inputs()).logits, batch)
        tokens = layouts.response_tokens(model, batch)
        got = layouts.per_sequence(
            response_token_logps(layouts.response_logits(model, tokens), tokens.labels), tokens
        )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
