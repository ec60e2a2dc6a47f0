"""Preference oracles for online and iterative rounds (the protocol is in `base.py`).

The judges themselves import lazily (`from spo_ray.judges import LLMJudge` loads only llm_judge.py), so
importing the protocol does not pull in Ray, transformers or vLLM.
"""

from __future__ import annotations

import importlib
from typing import Any

from spo_ray.judges.base import JUDGES, Judge, Judgement, JudgeRequest, build_judge, total_failures

_LAZY = {
    "RewardModelJudge": "spo_ray.judges.reward_model",
    "LLMJudge": "spo_ray.judges.llm_judge",
    "parse_verdict": "spo_ray.judges.llm_judge",
    "PythonJudge": "spo_ray.judges.python_callable",
}

__all__ = ["JUDGES", "Judge", "JudgeRequest", "Judgement", "build_judge", "total_failures", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spo_ray.judges' has no attribute {name!r}")
