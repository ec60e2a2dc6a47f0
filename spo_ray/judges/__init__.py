"""Preference oracles for online and iterative rounds (the protocol is in `base.py`)."""

from spo_ray.judges.base import JUDGES, Judge, Judgement, JudgeRequest, build_judge, total_failures

__all__ = ["JUDGES", "Judge", "JudgeRequest", "Judgement", "build_judge", "total_failures"]
