"""The LLM judge: verdict parsing, and end to end on a vLLM CPU engine with tiny judge LMs.

One engine serves the module: it starts through `build_judge` on the untrained tiny model, and the
other judge LMs (fine-tuned here in seconds: one that always answers "A", one that prefers the
response mentioning "apple") are loaded into it with `sync_weights`.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from spo_ray.config import JudgeConfig
from spo_ray.data.templating import load_tokenizer
from spo_ray.errors import ConfigError
from spo_ray.judges import JudgeRequest, LLMJudge, build_judge, parse_verdict, total_failures
from spo_ray.judges.llm_judge import judge_messages, resolve_judge_model
from spo_ray.rollout import state_dict_for_sync
from spo_ray.rollout.engines.base import encode_prompts

# Words of the tiny model's tokenizer corpus: the judge LMs train on phrases made of them.
VOCABULARY = (
    "the model a user cat my friend robot river plan likes writes finds needs short poem clear code "
    "good reason blue sky fresh bread two numbers kind reply next step long story"
)
WORDS = VOCABULARY.split()


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        ("A", "A"),
        ("B", "B"),
        ("a", "A"),
        (" b.\n", "B"),
        ("[[A]]", "A"),
        ("After comparing both, Response B is clearer. [[B]]", "B"),
        ("Response B", "B"),
        ("response a!", "A"),
        ("Answer: A", "A"),
        ("**Answer:** B", "B"),
        ("**B**", "B"),
        ("(A)", "A"),
        ("B)", "B"),
        ("The answer is A.", "A"),
        ("The better response is B", "B"),
        ("Response A is better.", "A"),
        ("I choose B", "B"),
        ("Verdict - A", "A"),
        ("B\n\nResponse A repeats the question.", "B"),
        ("Let me think.\nFinal answer: A", "A"),
        ("A or B", None),
        ("A and B", None),
        ("A\nB", None),
        ("[[A]] [[B]]", None),
        ("Both are fine.", None),
        ("Neither", None),
        ("", None),
        ("C", None),
        ("AB", None),
        ("a short poem", None),
        ("A cat likes fresh bread.", None),
        ("A: Paris.\n\nB:", None),  # SmolLM2-135M echoing the responses: labels, not verdicts
        ("B:", None),
        ("the robot writes a kind reply", None),
    ],
)
def test_parse_verdict_reads_many_answer_forms_and_refuses_both_or_neither(answer, verdict):
    assert parse_verdict(answer) == verdict


def test_a_judge_model_path_that_is_not_a_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"judge\.model_path.*no config\.json"):
        resolve_judge_model(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"judge\.model_path.*GGUF file .*missing\.gguf' does not exist"):
        resolve_judge_model(str(tmp_path / "missing.gguf"), work_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"judge\.model_path.*needs the judge LM"):
        build_judge(JudgeConfig(name="llm_judge"))


# ------------------------------------------------------------------------------ end to end on vLLM


def phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))


def always_a(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    return judge_messages(phrase(rng) + "?", phrase(rng), phrase(rng)), "A"


def mentions_apple(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    """Exactly one response mentions "apple"; the right answer names it."""
    words = phrase(rng).split()
    words.insert(rng.randrange(len(words) + 1), "apple")
    keyword, other = " ".join(words), phrase(rng)
    side = rng.choice("AB")
    pair = (keyword, other) if side == "A" else (other, keyword)
    return judge_messages(phrase(rng) + "?", *pair), side


def fine_tune_judge(model_dir, make_example, steps: int, seed: int = 0, lr: float = 3e-3):
    """The tiny LM trained with AdamW to answer `make_example`'s judge prompts (loss on answer + eos)."""
    tokenizer = load_tokenizer(str(model_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = [make_example(rng) for _ in range(32)]
        prompts = encode_prompts(tokenizer, [messages for messages, _ in batch])
        answers = [
            tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for _, answer in batch
        ]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)  # [batch, width], right-padded
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            input_ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            attention_mask[row, : len(prompt) + len(answer)] = 1
            labels[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def judge(ray_runtime, tiny_model_dir):
    """An LLM judge built from its config (it starts the module's one vLLM engine)."""
    cfg = JudgeConfig(name="llm_judge", model_path=str(tiny_model_dir), max_tokens=8, both_orders=True)
    llm_judge = build_judge(cfg)
    yield llm_judge
    llm_judge.close()


def load_judge_weights(judge: LLMJudge, model, version: int) -> None:
    judge.pool.sync_weights(state_dict_for_sync(model), version=version)


REQUESTS = [
    JudgeRequest(
        [{"role": "user", "content": "What is the blue sky?"}], ["the cat likes", "a robot", "the cat likes"]
    ),
    JudgeRequest(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Why does the river move?"}],
        ["my friend needs a plan", "clear code", "two numbers", "the next step"],
    ),
]


@pytest.mark.slow
def test_an_untrained_judge_lm_gives_unparseable_answers_counted_and_left_none(judge, tiny_model_dir):
    load_judge_weights(judge, AutoModelForCausalLM.from_pretrained(tiny_model_dir), version=1)
    assert isinstance(judge, LLMJudge) and judge.output == "pairwise"
    # The premise, checked on the raw answers: the untrained model's greedy answers are no verdicts.
    texts = REQUESTS[1].responses
    raw = judge.pool.generate(
        [judge_messages(REQUESTS[1].question, texts[0], texts[1])], max_tokens=8, temperature=0.0
    )
    assert parse_verdict(raw[0][0].text) is None, raw[0][0].text
    first, second = judge.judge(REQUESTS)
    # Request 0: responses 0 and 2 are identical (0.5, not asked); pairs {0,1}, {1,2} asked in both orders.
    assert first.failures == {"unparseable": 4, "no_verdict": 2}
    assert first.pairwise[0][2] == first.pairwise[2][0] == 0.5
    assert first.pairwise[0][1] is None and first.pairwise[1][2] is None and first.pairwise[2][1] is None
    assert [first.pairwise[i][i] for i in range(3)] == [0.5, 0.5, 0.5]
    assert second.failures == {"unparseable": 12, "no_verdict": 6}
    assert all(second.pairwise[i][j] is None for i in range(4) for j in range(4) if i != j)
    assert second.utilities() is None and second.win_probabilities() == [None] * 4
    assert "no verdict in the judge's answer" in judge.last_error


@pytest.mark.slow
def test_a_judge_that_always_answers_a_is_exactly_half_with_both_orders_and_one_without(
    judge, tiny_model_dir
):
    load_judge_weights(judge, fine_tune_judge(tiny_model_dir, always_a, steps=60), version=2)
    judgements = judge.judge(REQUESTS)
    assert total_failures(judgements) == {}
    for judgement in judgements:
        n = judgement.num_responses
        assert all(
            judgement.pairwise[i][j] == 0.5 for i in range(n) for j in range(n)
        )  # position bias cancels
    one_order = LLMJudge(tiny_model_dir, pool=judge.pool, both_orders=False, max_tokens=8)
    first, second = one_order.judge(REQUESTS)
    assert first.failures == {} and second.failures == {}
    assert first.pairwise[0][1] == 1.0 and first.pairwise[1][0] == 0.0 and first.pairwise[1][2] == 1.0
    assert first.pairwise[0][2] == 0.5  # identical texts are never asked
    assert all(second.pairwise[i][j] == (1.0 if i < j else 0.0) for i in range(4) for j in range(4) if i != j)
    one_order.close()  # the pool is borrowed: it keeps running
    assert judge.pool.policy_version == 2


@pytest.mark.slow
def test_a_judge_trained_to_prefer_a_keyword_picks_it_in_both_orders(judge, tiny_model_dir):
    # lr 3e-3 for 150 steps learned the keyword on some machines and an "always A" answer on others (seed 2 did at
    # 500 steps); lr 1e-3 for 300 steps learned it for seeds 0, 1 and 2
    judge_model = fine_tune_judge(tiny_model_dir, mentions_apple, steps=300, seed=1, lr=1e-3)
    load_judge_weights(judge, judge_model, version=3)
    requests = [
        JudgeRequest(
            [{"role": "user", "content": "What is the red apple?"}],
            ["the cat likes fresh bread", "a robot finds apple", "my friend writes clear code"],
        ),
        JudgeRequest(
            [{"role": "user", "content": "Tell me about the long story?"}],
            ["apple the model needs", "two numbers", "the river sees a plan", "good reason kind reply"],
        ),
    ]
    judgements = judge.judge(requests)
    for request, judgement in zip(requests, judgements):
        winner = next(k for k, text in enumerate(request.responses) if "apple" in text)
        for other in range(len(request.responses)):
            if other != winner:
                assert judgement.pairwise[winner][other] == 1.0, (request.responses, judgement.pairwise)
                assert judgement.pairwise[other][winner] == 0.0
        assert judgement.failures.get("no_verdict", 0) == 0
        assert max(range(len(request.responses)), key=judgement.win_probabilities().__getitem__) == winner


@pytest.mark.slow
def test_a_prompt_too_long_for_the_engine_is_counted_and_not_asked(judge, tiny_model_dir):
    long_response = "the cat likes a short poem " * 200  # far past the engine's 1024 tokens
    [judgement] = judge.judge(
        [JudgeRequest([{"role": "user", "content": "What is it?"}], ["A cat.", long_response])]
    )
    assert judgement.failures == {"too_long": 2, "no_verdict": 1}
    assert judgement.pairwise[0][1] is None and judgement.pairwise[1][0] is None
