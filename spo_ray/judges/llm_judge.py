"""A language model as a pairwise judge: "which response is better, A or B?", served by a RolloutPool.

For every request and unordered pair {i, j} of responses the judge LM is asked, greedily, with i shown
as Response A and j as Response B; with `both_orders` also with j as A and i as B. A verdict for the
response shown first counts 1, for the other 0, so with both orders

    P(i ≻ j) = mean(verdict(i, j), 1 − verdict(j, i))

and a judge that always picks the same position gets exactly 0.5: position bias cancels. Identical
responses get 0.5 without asking. An answer `parse_verdict` cannot read is counted `unparseable`; a
pair without any verdict is None in `pairwise` and counted `no_verdict`; a prompt too long for the
engine is counted `too_long`. A failure is never turned into a preference.
"""

from __future__ import annotations

import hashlib
import os
import re
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from spo_ray.errors import ConfigError, UserError
from spo_ray.judges.base import Judge, Judgement, JudgeRequest, actor_options

JUDGE_PROMPT = (
    "Which response answers the question better? Reply with one letter: A or B.\n\n"
    "Question: {question}\n\n"
    "Response A: {response_a}\n\n"
    "Response B: {response_b}"
)

# On a GPU the judge's vLLM engine takes this share of GPU memory unless `gpu_memory_utilization` is
# given (the policy's engines default to rollout.gpu_memory_utilization = 0.3 too).
GPU_MEMORY_UTILIZATION = 0.3

# A line that is a whole verdict: an optional label ("answer:", "the better response is", "I choose"),
# an optional "response"/"option"/"assistant", the letter, and an optional "is better" / "wins".
_LABEL = r"(?:the\s+)?(?:final\s+|better\s+|best\s+)?(?:answer|verdict|choice|winner|response)(?:\s+is)?"
_PICK = r"i\s+(?:choose|pick|prefer|select)"
_VERDICT_LINE = re.compile(
    rf"(?:(?:{_LABEL}|{_PICK})(?:\s*[:=\-]\s*|\s+))?"
    r"(?:(?:response|option|assistant|output)\s+)?"
    r"([ab])"
    r"(?:\s+(?:is\s+)?(?:better|best|wins))?"
)
_BRACKETED = re.compile(r"\[\[\s*([ab])\s*\]\]")  # MT-Bench's "[[A]]", anywhere in the answer
_DECORATION = str.maketrans("", "", "*_`\"'[](){}<>#")


def parse_verdict(text: str) -> str | None:
    """'A' or 'B' from a judge's answer, or None when it names neither or both.

    Reads `[[A]]` anywhere, else every line that is a whole verdict (`A`, `b.`, `**B**`, `Answer: A`,
    `Response B`, `The answer is A`), ignoring case, markdown and trailing punctuation; lines of prose
    ("a short poem") name nothing. Two different letters make the answer unparseable.
    """
    lowered = text.lower()
    found = set(_BRACKETED.findall(lowered))
    if not found:
        for line in lowered.splitlines():
            core = " ".join(line.translate(_DECORATION).split()).strip(" .,;!?-")
            match = _VERDICT_LINE.fullmatch(core)
            if match:
                found.add(match.group(1))
    return found.pop().upper() if len(found) == 1 else None


def judge_messages(question: str, response_a: str, response_b: str) -> list[dict[str, str]]:
    """The chat the judge LM answers: one user turn with JUDGE_PROMPT filled in."""
    content = JUDGE_PROMPT.format(question=question, response_a=response_a, response_b=response_b)
    return [{"role": "user", "content": content}]


def resolve_judge_model(model_path: str, work_dir: str | os.PathLike | None = None) -> str:
    """A Hugging Face folder for `judge.model_path`: a folder as given, or 'smollm2' / a .gguf file
    converted once under `work_dir` (default ~/.cache/spo_ray/judge_models)."""
    from spo_ray.models.loading import resolve_model_dir

    if not model_path:
        raise ConfigError(
            "judge.model_path", "judge.name=llm_judge needs the judge LM (folder, .gguf, 'smollm2')"
        )
    path = str(model_path)
    if path == "smollm2" or path.endswith(".gguf"):
        root = Path(work_dir) if work_dir else Path.home() / ".cache" / "spo_ray" / "judge_models"
        name = path if path == "smollm2" else f"{Path(path).stem}-{_short_hash(os.path.abspath(path))}"
        try:
            return resolve_model_dir(SimpleNamespace(path=path), root / name)
        except ConfigError as exc:
            raise ConfigError(
                "judge.model_path", str(exc).removeprefix(f"config key '{exc.key}': ")
            ) from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(
            "judge.model_path",
            f"'{path}' is not a Hugging Face model folder (no config.json; cwd: {os.getcwd()}); "
            "give a folder, a .gguf file, or 'smollm2'",
        )
    return os.path.abspath(path)


class LLMJudge(Judge):
    """Pairwise P(i ≻ j) from a judge LM in a RolloutPool (module docstring).

    Pass `pool` to judge with engines that already run (the judge then does not shut them down);
    otherwise `num_actors` engines of `backend` start on `model_path`, with `engine_options` for them.
    """

    output = "pairwise"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        num_actors: int = 1,
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        max_tokens: int = 8,
        both_orders: bool = True,
        timeout_s: float = 600.0,
        backend: str = "vllm",
        pool: Any = None,
        **engine_options: Any,
    ):
        from spo_ray.data.templating import load_tokenizer
        from spo_ray.rollout import RolloutPool

        self.model_path = os.fspath(model_path)
        self.max_tokens = max_tokens
        self.both_orders = both_orders
        self.tokenizer = load_tokenizer(self.model_path)
        options = pool.engine_options if pool is not None else engine_options
        self.max_model_len = options.get("max_model_len") or _max_positions(self.model_path)
        self.owns_pool = pool is None
        if pool is None:
            if backend == "vllm" and num_gpus_per_actor > 0:
                engine_options.setdefault("gpu_memory_utilization", GPU_MEMORY_UTILIZATION)
            pool = RolloutPool(
                self.model_path,
                num_actors=num_actors,
                backend=backend,
                num_cpus_per_actor=num_cpus_per_actor,
                num_gpus_per_actor=num_gpus_per_actor,
                timeout_s=timeout_s,
                sampling_defaults={"n": 1, "max_tokens": max_tokens, "temperature": 0.0},
                **engine_options,
            )
        self.pool = pool

    @classmethod
    def from_config(cls, cfg, *, task: Any = None, work_dir: str | os.PathLike | None = None) -> LLMJudge:
        """A judge from a JudgeConfig; 'smollm2' / .gguf models are converted under `work_dir` once."""
        return cls(
            resolve_judge_model(cfg.model_path, work_dir),
            max_tokens=cfg.max_tokens,
            both_orders=cfg.both_orders,
            **actor_options(cfg),
        )

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """Every pairwise question of every request goes out in one batched, greedy generate call."""
        from spo_ray.rollout.engines.base import encode_prompts

        if self.pool is None:
            raise UserError("LLMJudge.judge called after close()")
        questions: list[tuple[int, int, int]] = []  # (request, shown as A, shown as B)
        for r, request in enumerate(requests):
            texts = [response.strip() for response in request.responses]
            for i, j in combinations(range(len(texts)), 2):
                if texts[i] != texts[j]:
                    questions += [(r, i, j), (r, j, i)] if self.both_orders else [(r, i, j)]
        messages = [
            judge_messages(requests[r].question, requests[r].responses[a], requests[r].responses[b])
            for r, a, b in questions
        ]
        prompt_ids = encode_prompts(self.tokenizer, messages) if messages else []
        fits = [len(ids) + self.max_tokens <= self.max_model_len for ids in prompt_ids]
        sent = [ids for ids, ok in zip(prompt_ids, fits) if ok]
        samples = iter(
            self.pool.generate(sent, n=1, max_tokens=self.max_tokens, temperature=0.0) if sent else []
        )
        answers = [next(samples)[0].text if ok else None for ok in fits]
        return self._collect(requests, questions, fits, answers)

    def _collect(
        self,
        requests: list[JudgeRequest],
        questions: list[tuple[int, int, int]],
        fits: list[bool],
        answers: list[str | None],
    ) -> list[Judgement]:
        """Verdicts folded into one pairwise matrix per request; failures counted by reason."""
        judgements = []
        for request in requests:
            n = len(request.responses)
            pairwise: list[list[float | None]] = [[0.5] * n for _ in range(n)]
            judgements.append(Judgement(pairwise=pairwise, failures={}))
        votes: dict[tuple[int, int, int], list[float]] = {}  # (request, i, j) with i < j -> P(i ≻ j) votes
        for (r, a, b), ok, answer in zip(questions, fits, answers):
            failures = judgements[r].failures
            i, j = min(a, b), max(a, b)
            votes.setdefault((r, i, j), [])
            verdict = parse_verdict(answer) if ok else None
            if not ok:
                failures["too_long"] = failures.get("too_long", 0) + 1
                self.record_error(
                    "too_long", f"a judge prompt is over the engine's {self.max_model_len} tokens"
                )
            elif verdict is None:
                failures["unparseable"] = failures.get("unparseable", 0) + 1
                self.record_error("unparseable", f"no verdict in the judge's answer {answer!r}")
            else:
                first_wins = 1.0 if verdict == "A" else 0.0  # the response shown as A is `a`
                votes[r, i, j].append(first_wins if a == i else 1.0 - first_wins)
        for (r, i, j), pair_votes in votes.items():
            judgement = judgements[r]
            if not pair_votes:
                judgement.pairwise[i][j] = judgement.pairwise[j][i] = None
                judgement.failures["no_verdict"] = judgement.failures.get("no_verdict", 0) + 1
                continue
            p = sum(pair_votes) / len(pair_votes)
            judgement.pairwise[i][j], judgement.pairwise[j][i] = p, 1.0 - p
        return judgements

    def close(self) -> None:
        """Shut the engines down (unless the pool was passed in)."""
        if self.owns_pool and self.pool is not None:
            self.pool.shutdown()
        self.pool = None


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _max_positions(model_path: str) -> int:
    """The longest prompt + answer the engine takes, as its config says (vLLM's default max_model_len)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    config = config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)
