"""Iterative online alignment: rounds of generate -> judge -> build examples -> train -> sync."""

from spo_ray.iterative.examples import EXAMPLE_KINDS, JudgedPrompt, build_examples
from spo_ray.iterative.rounds import run_iterate
from spo_ray.iterative.stages import run_stages

__all__ = ["EXAMPLE_KINDS", "JudgedPrompt", "build_examples", "run_iterate", "run_stages"]
