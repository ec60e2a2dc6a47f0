"""The arithmetic task for iterative rounds: train, validation and test prompts, and the exact judge."""

from __future__ import annotations

import json
import os
from pathlib import Path

from spo_ray.judges.base import Judge, Judgement, JudgeRequest
from spo_ray.tasks.arithmetic.problems import Problem, make_splits, score

SPLITS = ("train", "validation", "test")


class ArithmeticJudge(Judge):
    """Scores 1 for a right final number and 0 otherwise, in the driver (it only reads text)."""

    output = "scores"

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        return [Judgement(scores=score(r.question, r.responses)) for r in requests]


class ArithmeticTask:
    """Seeded word problems: the rounds train on `train` and report accuracy on the held-out `test`."""

    name = "arithmetic"

    def __init__(self, splits: dict[str, list[Problem]], seed: int, operations: int):
        self.splits, self.seed, self.operations = splits, seed, operations

    @classmethod
    def build(cls, seed: int, num_train: int, num_heldout: int, operations: int) -> ArithmeticTask:
        sizes = {"train": num_train, "validation": num_heldout, "test": num_heldout}
        return cls(make_splits(seed, sizes, operations), seed, operations)

    def write(self, folder: str | os.PathLike) -> dict[str, Path]:
        """One JSONL file per split (`prompt`, `answer`); returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for split, problems in self.splits.items():
            paths[split] = folder / f"{split}.jsonl"
            rows = [json.dumps({"prompt": p.text, "answer": p.answer}) for p in problems]
            paths[split].write_text("".join(row + "\n" for row in rows))
        return paths

    def judge(self) -> ArithmeticJudge:
        return ArithmeticJudge()

    def prompt_messages(self, split: str = "train") -> list[list[dict[str, str]]]:
        return [[{"role": "user", "content": p.text}] for p in self.splits[split]]

    def eval_prompt_messages(self) -> list[list[dict[str, str]]]:
        """The held-out prompts each round's accuracy is measured on."""
        return self.prompt_messages("test")
