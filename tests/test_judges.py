"""The reward-model and Python-callable judges on real Ray, with a tiny sequence-classification model.

The LLM judge (vLLM) is tested in test_llm_judge.py.
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from spo_ray.config import JudgeConfig
from spo_ray.errors import ConfigError
from spo_ray.judges import JudgeRequest, PythonJudge, RewardModelJudge, build_judge
from spo_ray.judges.reward_model import RewardModelScorer, reward_model_ids

pytestmark = pytest.mark.slow

REQUESTS = [
    JudgeRequest([{"role": "user", "content": "What is the blue sky?"}], ["The blue sky.", "A cat.", "Why?"]),
    JudgeRequest(
        [
            {"role": "system", "content": "Be short."},
            {"role": "user", "content": "Tell me about fresh bread?"},
        ],
        ["Fresh bread is good.", "the robot builds a long story " * 6],
    ),
    JudgeRequest(
        [{"role": "user", "content": "Explain two numbers?"}], ["One and two.", "Three.", "", "Four."]
    ),
    JudgeRequest([{"role": "user", "content": "Where is the river?"}], ["Here."]),
    JudgeRequest(
        [{"role": "user", "content": "How can a user write clear code?"}], ["Slowly.", "With tests."]
    ),
]


def build_reward_model(out_dir, tokenizer_dir, num_labels: int, seed: int = 0):
    """A random tiny LlamaForSequenceClassification (head_dim 64) with the tiny model's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.3)  # scores of order 1, so 1e-5 agreement is a real check
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("reward_model")
    model, tokenizer = build_reward_model(out, tiny_model_dir, num_labels=1)
    return out, model, tokenizer


@pytest.fixture(scope="module")
def two_actor_judge(ray_runtime, reward_model):
    judge = RewardModelJudge(reward_model[0], num_actors=2, batch_size=16, max_length=64, timeout_s=120)
    yield judge
    judge.close()


def in_process_scores(model, tokenizer, request: JudgeRequest, max_length: int) -> list[float]:
    """One unpadded forward per response: the reference the actors must reproduce."""
    scores = []
    for response in request.responses:
        ids = reward_model_ids(tokenizer, request.prompt, response, max_length)
        with torch.no_grad():
            scores.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return scores


def test_reward_model_text_is_the_chat_template_of_prompt_and_response_cut_from_the_left(reward_model):
    _, _, tokenizer = reward_model
    prompt = [{"role": "user", "content": "Why does the cat move?"}]
    ids = reward_model_ids(tokenizer, prompt, "It sees the river.", max_length=10_000)
    expected = "<|im_start|>user\nWhy does the cat move?<|im_end|>\n<|im_start|>assistant\nIt sees the river.<|im_end|>\n"
    assert tokenizer.decode(ids) == expected
    assert reward_model_ids(tokenizer, prompt, "It sees the river.", max_length=7) == ids[-7:]


def test_reward_model_actors_score_like_an_in_process_forward_and_keep_request_order(
    two_actor_judge, reward_model
):
    _, model, tokenizer = reward_model
    judgements = two_actor_judge.judge(REQUESTS)
    assert len(judgements) == len(REQUESTS)
    for request, judgement in zip(REQUESTS, judgements):
        expected = in_process_scores(model, tokenizer, request, max_length=64)
        assert judgement.failures == {}
        assert len(judgement.scores) == len(request.responses)
        for got, want in zip(judgement.scores, expected):
            assert abs(got - want) <= 1e-5, (request.question, judgement.scores, expected)
    all_scores = [s for j in judgements for s in j.scores]
    assert max(all_scores) - min(all_scores) > 0.1  # the responses really score differently
    assert two_actor_judge.judge([]) == []


def test_batch_size_one_gives_the_same_scores_as_batches_of_sixteen(two_actor_judge, reward_model):
    cfg = JudgeConfig(name="reward_model", model_path=str(reward_model[0]), batch_size=1, max_length=64)
    with build_judge(cfg) as one_at_a_time:
        assert isinstance(one_at_a_time, RewardModelJudge) and one_at_a_time.output == "scores"
        singles = one_at_a_time.judge(REQUESTS)
    batched = two_actor_judge.judge(REQUESTS)
    for single, batch in zip(singles, batched):
        assert len(single.scores) == len(batch.scores)
        assert all(abs(a - b) <= 1e-5 for a, b in zip(single.scores, batch.scores))


def test_a_request_that_raises_gets_none_scores_and_an_error_count_others_are_scored(
    two_actor_judge, reward_model
):
    _, model, tokenizer = reward_model
    broken = JudgeRequest(
        [{"role": "user", "content": "What is it?"}], ["Fine.", None]
    )  # the template raises
    requests = [REQUESTS[0], broken, REQUESTS[4]]
    with pytest.warns(UserWarning, match="request 1"):
        first, failed, last = two_actor_judge.judge(requests)
    assert failed.scores == [None, None] and failed.failures == {"error": 1}
    assert failed.utilities() is None and failed.preference(0, 1) is None
    assert "request 1" in two_actor_judge.last_error
    for request, judgement in ((REQUESTS[0], first), (REQUESTS[4], last)):
        expected = in_process_scores(model, tokenizer, request, max_length=64)
        assert judgement.failures == {}
        assert all(abs(a - b) <= 1e-5 for a, b in zip(judgement.scores, expected))


def test_a_two_label_classifier_scores_logit_one_minus_logit_zero(tmp_path, tiny_model_dir):
    model, tokenizer = build_reward_model(tmp_path, tiny_model_dir, num_labels=2, seed=1)
    scorer = RewardModelScorer(str(tmp_path), batch_size=2, max_length=64, use_gpu=False)
    assert scorer.ready() is None
    [(scores, reason, message)] = scorer.score([(REQUESTS[0].prompt, REQUESTS[0].responses)])
    assert reason is None and message is None
    for response, score in zip(REQUESTS[0].responses, scores):
        ids = reward_model_ids(tokenizer, REQUESTS[0].prompt, response, 64)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        assert abs(score - (logits[1] - logits[0]).item()) <= 1e-5


def test_a_folder_that_is_not_a_sequence_classifier_is_refused_naming_judge_model_path(
    tmp_path, tiny_model_dir
):
    with pytest.raises(ConfigError, match=r"judge\.model_path.*does-not-exist.*no config\.json"):
        RewardModelJudge(tmp_path / "does-not-exist")
    with pytest.raises(
        ConfigError, match=r"judge\.model_path.*LlamaForCausalLM.*not a sequence-classification"
    ):
        RewardModelJudge(tiny_model_dir)  # a causal LM would load with a random score head: refused
    with pytest.raises(ConfigError, match=r"judge\.model_path.*needs the reward model's folder"):
        build_judge(JudgeConfig(name="reward_model"))


# ---------------------------------------------------------------------------------- Python callable

JUDGE_MODULE = """
import math
import os

from spo_test_judge_helpers import word_count

NOT_CALLABLE = 3


def score(prompt, responses):
    if "explode" in prompt:
        raise ValueError(f"cannot judge {prompt!r}")
    return [word_count(r) + len(prompt) / 100 for r in responses]


def bad(prompt, responses):
    kind = prompt.split()[0]
    outputs = {
        "short": [1.0] * (len(responses) - 1),
        "nan": [math.nan] * len(responses),
        "inf": [math.inf] * len(responses),
        "text": ["high"] * len(responses),
        "bool": [True] * len(responses),
        "none": None,
        "string": "1.0",
    }
    return outputs.get(kind, [float(len(r)) for r in responses])


def pid(prompt, responses):
    return [float(os.getpid())] * len(responses)


def slow(prompt, responses):
    if "sleep" in prompt:
        import time

        time.sleep(60)
    return [0.0] * len(responses)
"""


@pytest.fixture(scope="module")
def driver_only_module(tmp_path_factory):
    """spo_test_judge_fns (and a helper beside it) in a folder only the driver's sys.path has."""
    import sys

    folder = tmp_path_factory.mktemp("user_code")
    (folder / "spo_test_judge_fns.py").write_text(textwrap.dedent(JUDGE_MODULE))
    (folder / "spo_test_judge_helpers.py").write_text("def word_count(text):\n    return len(text.split())\n")
    sys.path.insert(0, str(folder))
    yield "spo_test_judge_fns"
    sys.path.remove(str(folder))


def request(prompt: str, responses: list[str]) -> JudgeRequest:
    return JudgeRequest(
        [{"role": "system", "content": "Judge."}, {"role": "user", "content": prompt}], responses
    )


def test_a_callable_in_a_driver_only_module_scores_requests_in_ray_tasks(ray_runtime, driver_only_module):
    cfg = JudgeConfig(name="python", callable=f"{driver_only_module}:score", num_actors=2)
    requests = [request(f"prompt {k}", ["a b", "a b c d", ""] if k % 2 else ["one"]) for k in range(5)]
    with build_judge(cfg) as judge:
        assert isinstance(judge, PythonJudge)
        judgements = judge.judge(requests)
    for req, judgement in zip(requests, judgements):
        assert judgement.failures == {}
        assert judgement.scores == [len(r.split()) + len(req.question) / 100 for r in req.responses]
    with PythonJudge(f"{driver_only_module}:pid", num_actors=2) as judge:
        pids = {s for j in judge.judge(requests) for s in j.scores}
    # the calls ran in Ray worker processes (Ray may reuse one worker for both chunks)
    assert pids and os.getpid() not in pids


def test_a_callable_that_raises_on_some_prompts_counts_errors_for_exactly_those(
    ray_runtime, driver_only_module
):
    judge = PythonJudge(f"{driver_only_module}:score", num_actors=2)
    prompts = ["fine", "explode now", "fine too", "fine again", "explode later"]
    with pytest.warns(UserWarning, match="request 1: ValueError"):
        judgements = judge.judge([request(p, ["x y", "z"]) for p in prompts])
    for prompt, judgement in zip(prompts, judgements):
        if "explode" in prompt:
            assert judgement.scores == [None, None] and judgement.failures == {"error": 1}
        else:
            assert (
                judgement.scores == [2 + len(prompt) / 100, 1 + len(prompt) / 100] and not judgement.failures
            )
    assert judge.last_error.startswith("request 4: ValueError: cannot judge 'explode later'")


def test_bad_output_is_counted_and_never_becomes_a_score(ray_runtime, driver_only_module):
    judge = PythonJudge(f"{driver_only_module}:bad", num_actors=1)
    kinds = ["short", "nan", "inf", "text", "bool", "none", "string", "good"]
    with pytest.warns(UserWarning, match="bad_output"):
        judgements = judge.judge([request(f"{kind} please", ["ab", "abc"]) for kind in kinds])
    for kind, judgement in zip(kinds, judgements):
        if kind == "good":
            assert judgement.scores == [2.0, 3.0] and judgement.failures == {}
        else:
            assert judgement.scores == [None, None] and judgement.failures == {"bad_output": 1}, kind
    assert judge.last_error == "request 6: returned a str, not a list of 2 numbers"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("no_function_named", "is not of the form 'pkg.module:function'"),
        ("spo_test_no_such_module:score", "module 'spo_test_no_such_module' cannot be imported"),
        ("spo_test_judge_fns:missing", "has no attribute 'missing'"),
        ("spo_test_judge_fns:NOT_CALLABLE", "is not callable (it is a int)"),
        ("", "needs 'pkg.module:function'"),
    ],
)
def test_a_bad_callable_path_is_a_config_error_naming_judge_callable(driver_only_module, path, problem):
    with pytest.raises(ConfigError, match=r"config key 'judge\.callable'") as error:
        build_judge(JudgeConfig(name="python", callable=path))
    assert problem in str(error.value)


def test_a_request_past_the_timeout_is_cancelled_and_counted(ray_runtime, driver_only_module):
    judge = PythonJudge(f"{driver_only_module}:slow", num_actors=2, timeout_s=6)
    with pytest.warns(UserWarning, match="timeout"):
        quick, stuck = judge.judge([request("quick", ["a"]), request("sleep", ["a", "b"])])
    assert quick.scores == [0.0] and quick.failures == {}
    assert stuck.scores == [None, None] and stuck.failures == {"timeout": 1}


def test_a_task_name_as_judge_picks_that_tasks_exact_judge_and_says_it_needs_the_task():
    from spo_ray.errors import ConfigError
    from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask

    task = SyntheticExpertTask.build(seed=0, num_prompts=2, num_candidates=3)
    judge = build_judge(JudgeConfig(name="synthetic_expert"), task=task)
    verdict = judge.judge([JudgeRequest(task.prompt_messages()[1], task.candidates[1])])[0]
    assert verdict.scores == pytest.approx(task.rewards[1])
    with pytest.raises(ConfigError, match=r"judge\.name.*no task: set task\.name=synthetic_expert"):
        build_judge(JudgeConfig(name="synthetic_expert"))


def test_the_default_judge_is_the_built_in_tasks_and_without_a_task_the_error_says_to_set_one():
    from spo_ray.errors import ConfigError
    from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask

    assert JudgeConfig().name == "task"
    task = SyntheticExpertTask.build(seed=1, num_prompts=2, num_candidates=3)
    verdict = build_judge(JudgeConfig(), task=task).judge(
        [JudgeRequest(task.prompt_messages()[0], task.candidates[0])]
    )
    assert verdict[0].scores == pytest.approx(task.rewards[0])
    with pytest.raises(
        ConfigError, match=r"judge\.name.*no task: set task\.name \(e\.g\. synthetic_expert\)"
    ):
        build_judge(JudgeConfig())
