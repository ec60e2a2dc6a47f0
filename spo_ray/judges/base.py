"""The judge protocol: a prompt and n responses in, scores or pairwise preference probabilities out.

Every judge (reward model, LLM judge, Python callable, a built-in task's exact judge) implements `Judge.judge`,
batched over prompts. A judge that cannot give a verdict (an unparseable LLM answer, an exception in
a callable) leaves that entry `None` and counts the reason in `Judgement.failures`: a failure is never
turned into a preference. `build_judge` maps `judge.name` to its class (imported lazily), or to the judge of
the run's built-in task when `judge.name` is "task" or that task's name (`spo_ray.tasks`).
"""

from __future__ import annotations

import importlib
import math
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

JUDGES: dict[str, str] = {
    "reward_model": "spo_ray.judges.reward_model:RewardModelJudge",
    "llm_judge": "spo_ray.judges.llm_judge:LLMJudge",
    "python": "spo_ray.judges.python_callable:PythonJudge",
}

# judge.name for "the run's built-in task's exact judge" (a task's own name says the same)
TASK_JUDGE = "task"

# a scoring call's outcome per request: (scores, None, None), or (None, failure reason, message)
RequestResult = tuple["list[float] | None", "str | None", "str | None"]

# logit(P) is clamped to ±LOGIT_CLAMP when pairwise probabilities become utilities (P = 0 or 1 happen)
LOGIT_CLAMP = 10.0


@dataclass
class JudgeRequest:
    """One prompt (chat messages, last one from the user) and the n responses to judge."""

    prompt: list[dict[str, str]]
    responses: list[str]

    @property
    def question(self) -> str:
        """The last user message: what judges that take a plain string see."""
        for message in reversed(self.prompt):
            if message["role"] == "user":
                return message["content"]
        return self.prompt[-1]["content"]


@dataclass
class Judgement:
    """A judge's verdict on one request: `scores` [n] (higher is better) or `pairwise` [n][n] with
    P(i ≻ j) (None where the judge failed), plus failure counts by reason."""

    scores: list[float | None] | None = None
    pairwise: list[list[float | None]] | None = None
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def num_responses(self) -> int:
        return len(self.scores) if self.scores is not None else len(self.pairwise or [])

    def preference(self, i: int, j: int) -> float | None:
        """P(response i ≻ response j): the judge's own probability, or σ(s_i − s_j) for a scoring judge."""
        if self.pairwise is not None:
            return self.pairwise[i][j]
        if self.scores is None or self.scores[i] is None or self.scores[j] is None:
            return None
        return 1.0 / (1.0 + math.exp(-(self.scores[i] - self.scores[j])))

    def utilities(self) -> list[float] | None:
        """Scores, or Bradley–Terry utilities mean_j logit P(i ≻ j) from pairwise verdicts (exact up to a
        constant when the judge is Bradley–Terry); None if any needed verdict is missing."""
        if self.scores is not None:
            return None if any(s is None for s in self.scores) else list(self.scores)
        n = self.num_responses
        utilities = []
        for i in range(n):
            logits = []
            for j in range(n):
                p = self.preference(i, j) if i != j else 0.5
                if p is None:
                    return None
                p = min(max(p, 1e-12), 1 - 1e-12)
                logits.append(max(-LOGIT_CLAMP, min(LOGIT_CLAMP, math.log(p / (1 - p)))))
            utilities.append(sum(logits) / n)
        return utilities

    def win_probabilities(self) -> list[float | None]:
        """P̂(y_i ≻ the others) = mean over j ≠ i of P(i ≻ j), skipping missing verdicts (SPPO's estimate)."""
        n = self.num_responses
        out = []
        for i in range(n):
            known = [p for j in range(n) if j != i and (p := self.preference(i, j)) is not None]
            out.append(sum(known) / len(known) if known else None)
        return out


def total_failures(judgements: list[Judgement]) -> dict[str, int]:
    """Failure counts summed over judgements, by reason."""
    total: Counter[str] = Counter()
    for judgement in judgements:
        total.update(judgement.failures)
    return dict(total)


class Judge(ABC):
    """A preference oracle. `output` says what `judge` fills: 'scores' or 'pairwise'.

    `last_error` keeps the message of the latest failure that has one (None while there was none).
    """

    output: str = "scores"
    last_error: str | None = None

    @abstractmethod
    def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """One Judgement per request, in order; failures counted, never guessed."""

    def close(self) -> None:  # noqa: B027 (a default, not an abstract method)
        """Release actors and engines (a no-op for judges that hold none)."""

    def record_error(self, reason: str, message: str) -> None:
        """Keep `message` as `last_error`; a judge's first one is also a warning, so it is seen."""
        if self.last_error is None:
            warnings.warn(f"{type(self).__name__}: {message} (counted as failure {reason!r})", stacklevel=2)
        self.last_error = message

    def scored_judgements(
        self, requests: list[JudgeRequest], results: list[RequestResult]
    ) -> list[Judgement]:
        """Judgements from per-request (scores, failure reason, message) results, in request order; a failed
        request scores None for each response, counts its reason and records its message."""
        judgements = []
        for request, (scores, reason, message) in zip(requests, results):
            if reason is None:
                judgements.append(Judgement(scores=scores))
                continue
            self.record_error(reason, message)
            judgements.append(Judgement(scores=[None] * len(request.responses), failures={reason: 1}))
        return judgements

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def contiguous_chunks(num_items: int, num_parts: int) -> list[slice]:
    """Split range(num_items) into at most `num_parts` contiguous, non-empty slices of near-equal size."""
    parts = max(1, min(num_parts, num_items))
    bounds = [round(i * num_items / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


def actor_options(cfg) -> dict[str, Any]:
    """The Ray placement and timeout settings of a JudgeConfig, as keyword arguments of a judge class."""
    return {
        "num_actors": cfg.num_actors,
        "num_cpus_per_actor": cfg.num_cpus_per_actor,
        "num_gpus_per_actor": cfg.num_gpus_per_actor,
        "timeout_s": cfg.timeout_s,
    }


def build_judge(cfg, *, task: Any = None) -> Judge:
    """The judge named by `cfg.name` (a JudgeConfig); `task`: the run's built-in task, whose `judge()` is used
    when `cfg.name` is "task" or the task's name."""
    if task is not None and cfg.name in (TASK_JUDGE, task.name):
        return task.judge()
    if cfg.name not in JUDGES:
        from spo_ray.errors import ConfigError

        wanted = "task.name (e.g. synthetic_expert)" if cfg.name == TASK_JUDGE else f"task.name={cfg.name}"
        raise ConfigError(
            "judge.name",
            f"'{cfg.name}' is a built-in task's exact judge, and this run has no task: set {wanted}, "
            f"or pick a judge of its own ({', '.join(JUDGES)})",
        )
    module_name, class_name = JUDGES[cfg.name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_config(cfg, task=task)
