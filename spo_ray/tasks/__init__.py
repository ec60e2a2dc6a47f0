"""Built-in tasks with known answers: their data, reference and exact evaluation (SPEC.md §3).

A task is a module registered in `TASKS` under its `task.name`, with two functions:

    prepare(cfg, out) -> (cfg, task)      write the task's data and reference into `out` once; return the
                                           config that trains on them and the task object
    run_job(cfg, callbacks) -> summary    train with the task's exact evaluation before and after

and a task object with `name`, `judge()` (its exact judge, picked by `judge.name: task` or the task's name),
`prompt_messages()`, and optionally `eval_prompt_messages()` (held-out prompts of the rounds' evaluation)
and `exact_metrics(model_dir, alpha)` (exact metrics of a model folder). Generic code (training, data, eval, rollout)
never imports this package: the API, the commands and the iterative rounds reach a task by its name here.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from spo_ray.config import Config

TASKS = {
    "synthetic_expert": "spo_ray.tasks.synthetic_expert.job",
    "arithmetic": "spo_ray.tasks.arithmetic.job",
}


def task_module(name: str) -> ModuleType | None:
    """The module of the built-in task `name`, or None for `none`."""
    if name == "none":
        return None
    return importlib.import_module(TASKS[name])


def prepare_task(cfg: Config, out: Path) -> tuple[Config, Any]:
    """(the config that trains on the task's data and reference, the task object); (cfg, None) without one."""
    module = task_module(cfg.task.name)
    return (cfg, None) if module is None else module.prepare(cfg, out)


def run_job(cfg: Config, callbacks: Sequence[Any] = ()) -> dict:
    """A training run: through the built-in task's job when `task.name` names one (exact evaluation)."""
    module = task_module(cfg.task.name)
    if module is None:
        from spo_ray.training.runner import run_training

        return run_training(cfg, callbacks=callbacks)
    return module.run_job(cfg, callbacks=callbacks)
