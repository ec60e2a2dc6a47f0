"""Files of the synthetic expert task: the task itself, Bradley–Terry preference pairs, and its prompts."""

from __future__ import annotations

import os
from pathlib import Path

from spo_ray.tasks.synthetic_expert.task import SyntheticExpertTask


def write_synthetic_expert_data(
    out_dir: str | os.PathLike, task: SyntheticExpertTask, num_pairs: int, seed: int = 0
) -> dict[str, Path]:
    """Write task.json, preferences.jsonl (explicit {prompt, chosen, rejected}) and prompts.jsonl to out_dir.

    Returns their paths under the keys "task", "preferences" and "prompts" (the regularization prompts).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "task": task.save(out / "task.json"),
        "preferences": task.write_preferences(out / "preferences.jsonl", num_pairs, seed),
        "prompts": task.write_prompts(out / "prompts.jsonl"),
    }
