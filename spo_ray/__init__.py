"""spo_ray: Soft Preference Optimization on Ray Train, Ray Data and vLLM.

The public API (README: Python API)::

    import spo_ray

    cfg = spo_ray.Config.from_yaml("configs/tiny_cpu.yaml", {"train.max_steps": 20})
    result = spo_ray.train(cfg, train_dataset=rows, callbacks=[MyCallback()])
    result.final_model, result.checkpoint, result.metrics[-1]

Names are imported on first use, so `import spo_ray` stays light (no torch or Ray until they are needed).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "spo_ray.config",
    "ConfigError": "spo_ray.errors",
    "DataError": "spo_ray.errors",
    "UserError": "spo_ray.errors",
    "train": "spo_ray.api",
    "iterate": "spo_ray.api",
    "generate": "spo_ray.api",
    "extrapolate": "spo_ray.api",
    "TrainResult": "spo_ray.api",
    "IterateResult": "spo_ray.api",
    "Callback": "spo_ray.training.callbacks",
    "CallbackError": "spo_ray.training.callbacks",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spo_ray' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
