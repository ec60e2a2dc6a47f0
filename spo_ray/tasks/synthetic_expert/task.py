"""A task with a known expert: prompts, finite candidate sets S(x), a reward table, and a Bradley–Terry judge."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from spo_ray.judges.base import Judge, Judgement, JudgeRequest

# Each topic: a short user question and eight short, distinct answers (a few BPE tokens each).
TOPICS: list[tuple[str, list[str]]] = [
    ("Name a color.", ["Red.", "Blue.", "Green.", "Yellow.", "Purple.", "Orange.", "Black.", "White."]),
    ("Name a fruit.", ["Apple.", "Pear.", "Plum.", "Grape.", "Lemon.", "Mango.", "Peach.", "Cherry."]),
    ("Pick a number.", ["One.", "Two.", "Three.", "Four.", "Five.", "Six.", "Seven.", "Eight."]),
    (
        "Name an animal.",
        ["A cat.", "A dog.", "A fox.", "A cow.", "A bird.", "A fish.", "A horse.", "A bear."],
    ),
    (
        "Name a day.",
        ["Monday.", "Tuesday.", "Friday.", "Sunday.", "Today.", "Tomorrow.", "Saturday.", "Noon."],
    ),
    (
        "Name a shape.",
        ["A circle.", "A square.", "A triangle.", "A star.", "A line.", "A cube.", "A cone.", "A ring."],
    ),
    ("Name a drink.", ["Water.", "Tea.", "Coffee.", "Milk.", "Juice.", "Soda.", "Cocoa.", "Lemonade."]),
    (
        "Name a place.",
        ["The park.", "The sea.", "A city.", "A farm.", "The moon.", "A school.", "The hills.", "A shop."],
    ),
    (
        "Name a tool.",
        ["A hammer.", "A saw.", "A drill.", "A wrench.", "A knife.", "A rope.", "A brush.", "A pen."],
    ),
    ("Name a sport.", ["Tennis.", "Golf.", "Chess.", "Soccer.", "Rugby.", "Boxing.", "Rowing.", "Skiing."]),
    ("Name a month.", ["January.", "March.", "May.", "July.", "August.", "October.", "June.", "April."]),
    (
        "Name a planet.",
        ["Mars.", "Venus.", "Earth.", "Saturn.", "Jupiter.", "Mercury.", "Neptune.", "Uranus."],
    ),
]

# Score of a response outside S(x): far below every reward in the table (rewards lie within ±reward_spread).
OUTSIDE_SCORE = -10.0


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _normalize_response(text: str) -> str:
    """Match generated text to a candidate: strip whitespace and a trailing end-of-turn token."""
    return text.strip().removesuffix("<|im_end|>").strip()


@dataclass
class SyntheticExpertTask:
    """Prompts x, candidates S(x), rewards r[x][k], and a non-uniform reference q[x][k] over S(x)."""

    name: ClassVar[str] = "synthetic_expert"  # task.name, and judge.name for its exact judge
    prompts: list[str]
    candidates: list[list[str]]  # [P][K]
    rewards: list[list[float]]  # [P][K]
    reference: list[list[float]]  # [P][K], rows sum to 1
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = {len(self.prompts), len(self.candidates), len(self.rewards), len(self.reference)}
        if len(sizes) != 1:
            raise ValueError(
                f"SyntheticExpertTask: prompts/candidates/rewards/reference differ in length {sizes}"
            )
        widths = {len(row) for table in (self.candidates, self.rewards, self.reference) for row in table}
        if len(widths) != 1 or min(widths) < 2:
            raise ValueError(
                f"SyntheticExpertTask: every prompt needs the same K >= 2 candidates, got {widths}"
            )
        for prompt, row in zip(self.prompts, self.candidates):
            if len(set(map(_normalize_response, row))) != len(row):
                raise ValueError(f"SyntheticExpertTask: candidates of {prompt!r} are not distinct: {row}")
        if len(set(self.prompts)) != len(self.prompts):
            raise ValueError("SyntheticExpertTask: prompts must be distinct")
        self._index = {prompt: i for i, prompt in enumerate(self.prompts)}

    # ------------------------------------------------------------------ building and files

    @classmethod
    def build(
        cls,
        seed: int = 0,
        num_prompts: int = 8,
        num_candidates: int = 5,
        reward_spread: float = 3.0,
        reference_tilt: float = 1.0,
        reference_floor: float = 0.15,
    ) -> SyntheticExpertTask:
        """A seeded task: rewards evenly spread over ±reward_spread/2 (shuffled, jittered); q ∝ exp(−tilt·r).

        q is mixed with a uniform share `reference_floor` so every candidate keeps some mass; being
        anti-aligned with r, it makes DPO's optimum ∝ q·exp(r/β) differ from SPO's softmax(r/α).
        """
        if not 1 <= num_prompts <= len(TOPICS):
            raise ValueError(f"num_prompts must be in 1..{len(TOPICS)}, got {num_prompts}")
        if not 2 <= num_candidates <= len(TOPICS[0][1]):
            raise ValueError(f"num_candidates must be in 2..{len(TOPICS[0][1])}, got {num_candidates}")
        rng = random.Random(seed)
        topics = rng.sample(TOPICS, num_prompts)
        levels = [reward_spread * (k / (num_candidates - 1) - 0.5) for k in range(num_candidates)]
        prompts, candidates, rewards, reference = [], [], [], []
        for question, answers in topics:
            prompts.append(question)
            candidates.append(rng.sample(answers, num_candidates))
            row = [level + rng.gauss(0.0, 0.1) for level in rng.sample(levels, num_candidates)]
            rewards.append([round(value, 4) for value in row])
            tilted = [math.exp(-reference_tilt * value + rng.gauss(0.0, 0.2)) for value in row]
            total = sum(tilted)
            q = [(1 - reference_floor) * t / total + reference_floor / num_candidates for t in tilted]
            reference.append([value / sum(q) for value in q])
        return cls(prompts=prompts, candidates=candidates, rewards=rewards, reference=reference, seed=seed)

    def to_dict(self) -> dict:
        """Plain JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SyntheticExpertTask:
        """Inverse of to_dict."""
        fields = {key: data[key] for key in ("prompts", "candidates", "rewards", "reference")}
        return cls(**fields, seed=data.get("seed", 0))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the task as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SyntheticExpertTask:
        """Read a task written by save()."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------------ distributions

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def num_candidates(self) -> int:
        return len(self.candidates[0])

    def reward_tensor(self) -> torch.Tensor:
        """r as a float64 tensor [P, K]."""
        return torch.tensor(self.rewards, dtype=torch.float64)

    def reference_tensor(self) -> torch.Tensor:
        """q as a float64 tensor [P, K]."""
        return torch.tensor(self.reference, dtype=torch.float64)

    def target_distribution(self, alpha: float) -> torch.Tensor:
        """SPO's optimum on S: softmax(r/α) per prompt, [P, K] float64 (SPEC.md §2.3)."""
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        return torch.softmax(self.reward_tensor() / alpha, dim=-1)

    def dpo_optimum(self, beta: float, reference: torch.Tensor | None = None) -> torch.Tensor:
        """DPO's optimum on S: ∝ π_ref·exp(r/β), [P, K]; π_ref is q unless `reference` [P, K] is given."""
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        ref = self.reference_tensor() if reference is None else reference.to(torch.float64)
        return torch.softmax(torch.log(ref) + self.reward_tensor() / beta, dim=-1)

    # ------------------------------------------------------------------ preference data

    def sample_pairs(self, num_pairs: int, rng_seed: int = 0) -> list[dict]:
        """Explicit rows {prompt, chosen, rejected}: x uniform, a distinct pair uniform, winner by σ(r1 − r2)."""
        rng = random.Random(rng_seed)
        pairs = list(itertools.combinations(range(self.num_candidates), 2))
        rows = []
        for _ in range(num_pairs):
            x = rng.randrange(self.num_prompts)
            first, second = rng.choice(pairs)
            if rng.random() < 0.5:
                first, second = second, first
            p_first = _sigmoid(self.rewards[x][first] - self.rewards[x][second])
            chosen, rejected = (first, second) if rng.random() < p_first else (second, first)
            rows.append(
                {
                    "prompt": self.prompts[x],
                    "chosen": self.candidates[x][chosen],
                    "rejected": self.candidates[x][rejected],
                }
            )
        return rows

    def write_preferences(self, path: str | os.PathLike, num_pairs: int, seed: int = 0) -> Path:
        """Write sample_pairs(num_pairs, seed) as JSONL in the explicit preference format."""
        return _write_jsonl(path, self.sample_pairs(num_pairs, seed))

    def write_prompts(self, path: str | os.PathLike) -> Path:
        """Write the prompts as JSONL rows {"prompt": ...} (the regularization prompt set)."""
        return _write_jsonl(path, [{"prompt": prompt} for prompt in self.prompts])

    # ------------------------------------------------------------------ judge protocol

    def candidate_index(self, prompt: str, response: str) -> int | None:
        """Index k of `response` in S(prompt) (whitespace and a trailing <|im_end|> ignored), or None."""
        wanted = _normalize_response(response)
        for k, candidate in enumerate(self.candidates[self._prompt_index(prompt)]):
            if _normalize_response(candidate) == wanted:
                return k
        return None

    def score(self, prompt: str, responses: list[str]) -> list[float]:
        """Rewards r(x, y) of the responses; a response outside S(x) scores OUTSIDE_SCORE (−10)."""
        x = self._prompt_index(prompt)
        scores = []
        for response in responses:
            k = self.candidate_index(prompt, response)
            scores.append(OUTSIDE_SCORE if k is None else self.rewards[x][k])
        return scores

    def preference_probability(self, prompt: str, a: str, b: str) -> float:
        """Bradley–Terry P(a ≻ b | prompt) = σ(r(a) − r(b))."""
        score_a, score_b = self.score(prompt, [a, b])
        return _sigmoid(score_a - score_b)

    # ---- the built-in task protocol (spo_ray.tasks): what iterative rounds and ExPO grids ask of a task

    def judge(self) -> SyntheticExpertJudge:
        """The exact Bradley–Terry expert (judge.name: synthetic_expert)."""
        return SyntheticExpertJudge(self)

    def prompt_messages(self) -> list[list[dict[str, str]]]:
        """The task's prompts as single user turns."""
        return [[{"role": "user", "content": prompt}] for prompt in self.prompts]

    def exact_metrics(self, model_dir: str | os.PathLike, alpha: float) -> dict:
        """Exact metrics of a model folder's π on S: rewards, TV to softmax(r/α), entropy, mass on S."""
        from spo_ray.tasks.synthetic_expert.evaluate import expert_metrics, model_distribution_on_s

        return expert_metrics(model_distribution_on_s(str(model_dir), self), self, alpha)

    def _prompt_index(self, prompt: str) -> int:
        try:
            return self._index[prompt]
        except KeyError:
            raise KeyError(f"prompt {prompt!r} is not one of the task's {self.num_prompts} prompts") from None


def _write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


class SyntheticExpertJudge(Judge):
    """The task's Bradley–Terry expert as a scoring judge: scores are the rewards r(x, y) (−10 outside S)."""

    output = "scores"

    def __init__(self, task: SyntheticExpertTask):
        self.task = task

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """Exact scores; the expert never fails (a prompt outside the task raises KeyError)."""
        return [Judgement(scores=self.task.score(r.question, r.responses)) for r in requests]
