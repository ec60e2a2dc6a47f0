"""Collated batches: the packed (padding-free) layout gives the same response log-probs as the padded one."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from spo_ray.data import collate_preference_batch, normalize_row, response_logps
from spo_ray.data.templating import Templater

ROWS = [
    {"prompt": "Why is the sky blue?", "chosen": "Light scatters in the air.", "rejected": "Paint."},
    {"prompt": "Hi", "chosen": "Hello there, friend!", "rejected": "Go."},
    {"prompt": "Name a fruit please, a red one.", "chosen": "An apple.", "rejected": "A car, surely."},
]


def numpy_rows(templater: Templater) -> dict[str, np.ndarray]:
    encoded = templater.encode([normalize_row(r) for r in ROWS])
    rows = {k: np.empty(len(encoded), dtype=object) for k in ("prompt_ids", "response_ids", "ranking")}
    for i, e in enumerate(encoded):
        rows["prompt_ids"][i] = np.array(e.prompt_ids, dtype=np.int32)
        rows["response_ids"][i] = [np.array(r, dtype=np.int32) for r in e.response_ids]
        rows["ranking"][i] = np.array(e.ranking)
    rows["example_id"] = np.array([10, 11, 12])
    return rows


def test_packed_and_padded_batches_give_the_same_response_logps(tiny_model_dir):
    templater = Templater.from_path(str(tiny_model_dir), max_length=64, max_prompt_length=32)
    rows = numpy_rows(templater)
    padded = collate_preference_batch(rows, templater.tokenizer.pad_token_id)
    packed = collate_preference_batch(rows, templater.tokenizer.pad_token_id, packing=True)

    lengths = (padded.prompt_lengths + padded.response_lengths).tolist()
    assert packed.input_ids.shape == (1, sum(lengths)) and packed.attention_mask is None
    assert packed.cu_seqlens.tolist() == np.cumsum([0] + lengths).tolist()
    assert packed.position_ids[0, : lengths[0] + 1].tolist() == list(range(lengths[0])) + [0]
    assert (
        packed.input_ids[0][packed.response_mask[0].bool()].tolist()
        == padded.input_ids[padded.response_mask.bool()].tolist()
    )
    assert packed.example_ids.tolist() == [10, 11, 12] and packed.ranking.tolist() == [[0, 1]] * 3

    # float64: sums near -130 are 1.5e-5 apart in float32 from rounding alone (one ulp); the layouts must agree
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        padded_logps = response_logps(model(**padded.model_inputs()).logits, padded)
        packed_logps = response_logps(model(**packed.model_inputs()).logits, packed)
    assert padded_logps.shape == (6,)
    assert torch.allclose(packed_logps, padded_logps, atol=1e-5, rtol=0)
    # The response's own tokens only: a per-sequence forward with no padding gives the same numbers.
    k = 3
    alone = padded.input_ids[k : k + 1, : lengths[k]]
    with torch.no_grad():
        logits = model(input_ids=alone).logits[0, :-1].log_softmax(-1)
    start = int(padded.prompt_lengths[k])
    targets = alone[0, start:]
    expected = logits[start - 1 :].gather(-1, targets[:, None]).sum()
    assert abs(float(expected) - float(padded_logps[k])) < 1e-5


def test_batches_move_to_a_device_with_all_their_tensors(tiny_model_dir):
    templater = Templater.from_path(str(tiny_model_dir), max_length=64, max_prompt_length=32)
    batch = collate_preference_batch(numpy_rows(templater), 0).to("cpu")
    assert batch.input_ids.dtype == torch.long and batch.response_mask.dtype == torch.long
    assert batch.num_sequences == 6 and batch.max_seqlen == batch.input_ids.shape[1]
