"""Preference data: reading, schema normalization, chat templates, tokenization, Ray Data pipeline."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at run time names load on first use
    from spo_ray.data.checks import inspect_paths, validate_paths
    from spo_ray.data.collate import PreferenceBatch, collate_preference_batch, response_logps
    from spo_ray.data.permutation import permute
    from spo_ray.data.pipeline import prepare_preference_data
    from spo_ray.data.prepared import PreparedData
    from spo_ray.data.prompts import PromptSet, load_reg_prompts, read_prompts
    from spo_ray.data.schema import REASONS, Example, RowProblem, detect_format, normalize_row
    from spo_ray.data.sharding import ShardPlan, shard_data_config, shard_plan, train_shards
    from spo_ray.data.templating import Templater

# Public names and the module that defines each; imported on first use so `spo-ray --help` stays fast.
_EXPORTS = {
    "prepare_preference_data": "pipeline",
    "PreparedData": "prepared",
    "train_shards": "sharding",
    "shard_data_config": "sharding",
    "shard_plan": "sharding",
    "ShardPlan": "sharding",
    "permute": "permutation",
    "collate_preference_batch": "collate",
    "PreferenceBatch": "collate",
    "response_logps": "collate",
    "load_reg_prompts": "prompts",
    "PromptSet": "prompts",
    "read_prompts": "prompts",
    "normalize_row": "schema",
    "detect_format": "schema",
    "Example": "schema",
    "RowProblem": "schema",
    "REASONS": "schema",
    "Templater": "templating",
    "validate_paths": "checks",
    "inspect_paths": "checks",
}

__all__ = [
    "REASONS",
    "Example",
    "PreferenceBatch",
    "PreparedData",
    "PromptSet",
    "RowProblem",
    "ShardPlan",
    "Templater",
    "collate_preference_batch",
    "detect_format",
    "inspect_paths",
    "load_reg_prompts",
    "normalize_row",
    "permute",
    "prepare_preference_data",
    "read_prompts",
    "response_logps",
    "shard_data_config",
    "shard_plan",
    "train_shards",
    "validate_paths",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spo_ray.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"spo_ray.data.{_EXPORTS[name]}"), name)
