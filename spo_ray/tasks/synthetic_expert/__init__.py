"""The synthetic expert task: prompts with finite candidate sets S(x), a known reward table and a non-uniform
reference, so SPO's optimum softmax(r/α) and DPO's π_ref·exp(r/β) can be checked exactly (SPEC.md §2.3).

`task.py` the task and its exact judge · `data.py` its preference files · `reference.py` the reference fitted
to its q · `evaluate.py` π on S by teacher forcing and its metrics · `job.py` the task's `prepare` and `run_job`
(the protocol of `spo_ray.tasks`).
"""

from __future__ import annotations

from spo_ray.tasks.synthetic_expert.task import SyntheticExpertJudge, SyntheticExpertTask

__all__ = [
    "SyntheticExpertJudge",
    "SyntheticExpertTask",
]
