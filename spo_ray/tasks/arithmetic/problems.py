"""Seeded arithmetic word problems and their judge: a verifiable task for a real instruct model.

A problem is a start amount and `operations` steps, each one add or subtract phrase, e.g.
"Mia has 12 marbles. Then Mia finds 7 more. Then Mia loses 5. How many marbles does Mia have now? Answer
with just the number." Every intermediate amount stays between 0 and 99. The judge reads the
problem back from its text (the phrases are fixed), so `score(prompt, responses)` needs nothing but the
prompt: it is also usable as `judge.callable = spo_ray.tasks.arithmetic.problems:score`.

A response is right when its last integer equals the answer (the GSM8K convention of the last number).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Tom", "Eli", "Ana", "Ben", "Lily"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells"]
# (phrase with {n}, sign): the only phrases a problem uses, so the judge can read them back.
STEPS = [
    ("buys {n} more", 1),
    ("finds {n} more", 1),
    ("gets {n} more from a friend", 1),
    ("gives away {n}", -1),
    ("loses {n}", -1),
    ("uses {n}", -1),
]
MAX_AMOUNT = 99
# SmolLM2-135M-Instruct, greedy, 32 one-step problems: 28% right with this instruction, 16% with "End your
# answer with the number.", 22% with "Think step by step, then give the final number."
INSTRUCTION = "Answer with just the number."
_START = re.compile(r"^(\w+) has (\d+) (\w+)\.")
_NUMBER = r"(\d+)"
_STEP = re.compile("|".join("(?:" + re.escape(p).replace(re.escape("{n}"), _NUMBER) + ")" for p, _ in STEPS))
_INTEGER = re.compile(r"-?\d[\d,]*")


@dataclass(frozen=True)
class Problem:
    text: str
    answer: int


def make_problem(rng: random.Random, operations: int) -> Problem:
    """One problem of `operations` steps drawn with `rng`."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    amount = rng.randint(2, 30)
    sentences = [f"{name} has {amount} {item}."]
    for _ in range(operations):
        phrase, sign = rng.choice(STEPS)
        room = MAX_AMOUNT - amount if sign > 0 else amount
        if room < 1:  # at a bound: take a step the other way
            phrase, sign = rng.choice([s for s in STEPS if s[1] == -sign])
            room = MAX_AMOUNT - amount if sign > 0 else amount
        n = rng.randint(1, min(room, 20))
        amount += sign * n
        sentences.append(f"Then {name} {phrase.format(n=n)}.")
    sentences.append(f"How many {item} does {name} have now? {INSTRUCTION}")
    return Problem(" ".join(sentences), amount)


def make_splits(seed: int, sizes: dict[str, int], operations: int) -> dict[str, list[Problem]]:
    """Disjoint splits (e.g. train, validation, test) of distinct problems, the same for a seed."""
    rng = random.Random(f"arithmetic:{seed}:{operations}")
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for split, size in sizes.items():
        problems: list[Problem] = []
        for _ in range(100 * size + 100):
            if len(problems) == size:
                break
            problem = make_problem(rng, operations)
            if problem.text not in seen:
                seen.add(problem.text)
                problems.append(problem)
        if len(problems) < size:
            raise ValueError(f"only {len(problems)} distinct problems for split {split!r} (asked {size})")
        splits[split] = problems
    return splits


def solve(prompt: str) -> int:
    """The answer of a problem read back from its text; ValueError for text that is not one."""
    start = _START.search(prompt.strip())
    if start is None:
        raise ValueError(f"not an arithmetic problem of this task: {prompt[:80]!r}")
    amount = int(start.group(2))
    for match in _STEP.finditer(prompt, start.end()):
        index = next(i for i, group in enumerate(match.groups()) if group is not None)
        amount += STEPS[index][1] * int(match.group(index + 1))
    return amount


def final_number(response: str) -> int | None:
    """The last integer in `response` (thousands commas allowed), or None when it has none."""
    numbers = _INTEGER.findall(response)
    return int(numbers[-1].replace(",", "")) if numbers else None


def score(prompt: str, responses: list[str]) -> list[float]:
    """1.0 for each response whose last integer is the problem's answer, else 0.0."""
    answer = solve(prompt)
    return [1.0 if final_number(response) == answer else 0.0 for response in responses]
