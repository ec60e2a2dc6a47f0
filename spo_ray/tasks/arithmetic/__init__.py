"""Arithmetic word problems with a Python judge: a verifiable task for iterative rounds on a real model."""

from spo_ray.tasks.arithmetic.problems import final_number, make_problem, make_splits, score, solve
from spo_ray.tasks.arithmetic.task import ArithmeticJudge, ArithmeticTask

__all__ = [
    "ArithmeticJudge",
    "ArithmeticTask",
    "final_number",
    "make_problem",
    "make_splits",
    "score",
    "solve",
]
