"""Chat templating, response masks, the truncation policy, the plain fallback and regularization prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizer_families import FAMILIES, TRICKY_ROWS, tokenizer_folder
from transformers import AutoTokenizer

from spo_ray.config import DataConfig
from spo_ray.data import collate_preference_batch, load_reg_prompts, normalize_row
from spo_ray.data.schema import RowProblem
from spo_ray.data.templating import Templater, load_tokenizer

ROW = {"prompt": "Why is the sky blue?", "chosen": "Light scatters.", "rejected": "It is paint."}


def as_rows(encoded) -> dict[str, np.ndarray]:
    """Tokenized examples as the numpy batch Ray Data's iter_batches yields."""
    rows = {
        "example_id": np.arange(len(encoded)),
        "prompt_ids": np.empty(len(encoded), dtype=object),
        "response_ids": np.empty(len(encoded), dtype=object),
        "ranking": np.empty(len(encoded), dtype=object),
    }
    for i, e in enumerate(encoded):
        rows["prompt_ids"][i] = np.array(e.prompt_ids, dtype=np.int32)
        rows["response_ids"][i] = [np.array(r, dtype=np.int32) for r in e.response_ids]
        rows["ranking"][i] = np.array(e.ranking + [-1] * (len(e.response_ids) - len(e.ranking)))
    return rows


@pytest.fixture(scope="module")
def templater(tiny_model_dir):
    return Templater.from_path(str(tiny_model_dir), max_length=64, max_prompt_length=24)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The transformers tokenizer of the same folder: what ids and texts are checked against."""
    return load_tokenizer(str(tiny_model_dir))


def test_prompt_plus_response_ids_are_the_templated_conversation_through_eos(templater, reference):
    example = normalize_row(ROW)
    (encoded,) = templater.encode([example])
    tokenizer = reference
    for response, ids in zip(example.responses, encoded.response_ids):
        full = tokenizer.apply_chat_template(
            example.prompt + [{"role": "assistant", "content": response}], tokenize=False
        )
        assert full.endswith("<|im_end|>\n")  # ChatML's newline after eos is not part of the response
        expected = tokenizer(full.removesuffix("\n"), add_special_tokens=False)["input_ids"]
        assert encoded.prompt_ids + ids == expected
        assert ids[-1] == tokenizer.eos_token_id


def test_response_mask_selects_exactly_the_response_tokens(templater, reference):
    encoded = templater.encode([normalize_row(ROW), normalize_row({**ROW, "prompt": "Hi", "chosen": "Yo!"})])
    batch = collate_preference_batch(as_rows(encoded), reference.pad_token_id)
    decode = reference.decode
    assert batch.input_ids.shape[0] == 4 and batch.num_responses == 2
    texts = [decode(ids[mask.bool()].tolist()) for ids, mask in zip(batch.input_ids, batch.response_mask)]
    assert texts == [
        "Light scatters.<|im_end|>",
        "It is paint.<|im_end|>",
        "Yo!<|im_end|>",
        "It is paint.<|im_end|>",
    ]
    prompt_only = batch.attention_mask.bool() & ~batch.response_mask.bool()
    assert (
        decode(batch.input_ids[2][prompt_only[2]].tolist())
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (batch.response_mask.sum(-1) == batch.response_lengths).all()
    assert (batch.attention_mask.sum(-1) == batch.prompt_lengths + batch.response_lengths).all()
    assert batch.ranking.tolist() == [[0, 1], [0, 1]] and batch.example_ids.tolist() == [0, 1]


def test_long_prompts_are_cut_from_the_left_and_responses_are_kept_whole(templater, reference):
    long_prompt = "First words. " + " ".join(f"w{i}" for i in range(40)) + " Last question?"
    (encoded,) = templater.encode([normalize_row({**ROW, "prompt": long_prompt})])
    assert encoded.prompt_truncated and len(encoded.prompt_ids) == 24
    prompt_text = reference.decode(encoded.prompt_ids)
    assert prompt_text.endswith("Last question?<|im_end|>\n<|im_start|>assistant\n")
    assert "First words" not in prompt_text
    assert reference.decode(encoded.response_ids[0]) == "Light scatters.<|im_end|>"


def test_a_response_that_cannot_fit_is_cut_to_fit_keeping_its_start_by_default(templater):
    long_reply = " ".join(["word"] * 80)
    (encoded,) = templater.encode([normalize_row({**ROW, "rejected": long_reply})])
    full = Templater(templater.tokenizer, 10_000, 24).encode(
        [normalize_row({**ROW, "rejected": long_reply})]
    )[0]
    assert encoded.responses_truncated and not full.responses_truncated
    assert len(encoded.prompt_ids) + len(encoded.response_ids[1]) == 64  # cut to exactly max_length
    assert encoded.response_ids[1] == full.response_ids[1][: 64 - len(encoded.prompt_ids)]  # its start
    assert encoded.response_ids[1][-1] != templater.eos_id  # a cut response did not end
    assert encoded.response_ids[0] == full.response_ids[0]  # the short one is whole


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_skip_and_error_policies_make_a_long_row_a_too_long_problem(templater, policy):
    strict = Templater(templater.tokenizer, 64, 24, on_long_rows=policy)
    (problem,) = strict.encode([normalize_row({**ROW, "rejected": " ".join(["word"] * 80)})])
    assert isinstance(problem, RowProblem)
    assert (problem.field, problem.reason) == ("rejected", "too_long")
    assert "data.max_length=64" in str(problem) and f"data.on_long_rows={policy}" in str(problem)


def test_responses_that_become_identical_when_cut_are_refused_not_trained(templater):
    shared = " ".join(["word"] * 80)
    row = {**ROW, "chosen": shared + " yes", "rejected": shared + " no"}
    (problem,) = templater.encode([normalize_row(row)])
    assert isinstance(problem, RowProblem)
    assert (problem.field, problem.reason) == ("rejected", "identical_after_truncation")


def test_tokenizers_without_a_chat_template_use_the_documented_plain_format(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    plain = Templater.from_path(str(tmp_path), max_length=64, max_prompt_length=32)
    assert not plain.has_template
    example = normalize_row(
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
            "chosen": "Yo",
            "rejected": "No",
        }
    )
    (encoded,) = plain.encode([example])
    assert tokenizer.decode(encoded.prompt_ids) == "<|im_start|>System: Be kind.\nUser: Hi\nAssistant: "
    assert [tokenizer.decode(r) for r in encoded.response_ids] == ["Yo<|im_end|>", "No<|im_end|>"]


def test_reg_prompts_come_from_the_prompt_file_or_else_from_the_train_prompts(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Tell me a story"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "Hi"}]})
        + "\n"
    )
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({**ROW, "chosen": f"c{i}"}) for i in range(3)) + "\n")
    decode = AutoTokenizer.from_pretrained(tiny_model_dir).decode
    from_file = load_reg_prompts(
        DataConfig(train_files=[str(train)], reg_prompts_file=str(prompts)), str(tiny_model_dir)
    )
    assert [decode(p) for p in from_file] == [
        "<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ]
    from_train = load_reg_prompts(DataConfig(train_files=[str(train)]), str(tiny_model_dir))
    assert [decode(p) for p in from_train] == [
        "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    ]


def test_reg_prompts_reach_each_worker_through_the_object_store_and_sample_as_the_lists_do(
    ray_runtime, tiny_model_dir, tmp_path
):
    from spo_ray.config import RolloutConfig
    from spo_ray.data import PromptSet
    from spo_ray.training.online import OnlineSampler

    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({**ROW, "prompt": f"Why {i}?"}) for i in range(7)) + "\n")
    prompts = load_reg_prompts(DataConfig(train_files=[str(train)]), str(tiny_model_dir))
    ref = ray_runtime.put(PromptSet.from_lists(prompts))  # what run_training puts in train_loop_config
    cfg = RolloutConfig(prompts_per_step=5)
    from_lists = OnlineSampler(None, prompts, cfg, rank=1, seed=3)
    from_ref = OnlineSampler(None, ref, cfg, rank=1, seed=3)
    assert len(from_ref.prompts) == 7 and [from_ref.prompts[i] for i in range(7)] == prompts
    for step in range(3):
        assert from_ref._prompts_for(step) == from_lists._prompts_for(step)


@pytest.mark.parametrize("family", FAMILIES)
def test_response_ids_are_those_of_the_whole_conversation_tokenized_at_once(family, tiny_model_dir, tmp_path):
    """The prompt is tokenized once per row and each reply from the prompt's last special token on
    (`Templater._reply_ids`); the ids must be exactly those of tokenizing prompt + reply whole."""
    path = tokenizer_folder(family, tiny_model_dir, tmp_path)
    templater = Templater.from_path(path, max_length=4096, max_prompt_length=2048)
    assert templater.anchors, "these tokenizers split at special tokens: the prompt is not re-tokenized"
    tokenizer = load_tokenizer(path)  # transformers' rendering and ids are the reference
    examples = [normalize_row(row) for row in TRICKY_ROWS]
    for example, encoded in zip(examples, templater.encode(examples)):
        prompt = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
        assert encoded.prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for response, ids in zip(example.responses, encoded.response_ids):
            full = tokenizer.apply_chat_template(
                example.prompt + [{"role": "assistant", "content": response}], tokenize=False
            )
            through_eos = full[: full.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]
            expected = tokenizer(through_eos, add_special_tokens=False)["input_ids"]
            assert encoded.prompt_ids + ids == expected, (family, response)
