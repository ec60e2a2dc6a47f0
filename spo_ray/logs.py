"""What a run prints: the one place that sets the console verbosity of the driver, Ray and the engines.

`logging.level` (or `spo-ray --verbose`) picks it. At "warning" (the default) a run shows its progress bar,
its own start and end lines and real warnings; library INFO lines go, and the warnings listed in BENIGN
(each with the reason it is harmless here) are dropped. "info" and "debug" show everything, BENIGN included.
Every process applies it the same way: the driver (`configure_logging`), Ray Train workers (from the config)
and rollout actors (from `process_env`, set in their runtime_env).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LEVEL_ENV = "SPO_RAY_LOG_LEVEL"
LEVELS = {"warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}

# (text in the message, why it is harmless here); dropped at level "warning" only
BENIGN = (
    (
        "Failed to load weights",
        "vLLM reloading weights (rollout.cpu_weights=packed): RotaryEmbedding has no weights in a checkpoint (its "
        "cos/sin cache is computed), so vLLM keeps it as it was; every real weight is loaded "
        "(tests/test_rollout_weights.py)",
    ),
    ("doesn't allow to use `torch.set_num_threads`", "vLLM CPU: threads are bound once at start"),
    ("is not found in LD_PRELOAD", "vLLM CPU: tcmalloc/iomp would only be faster"),
    ("requires Triton", "vLLM CPU: falls back to its V1 model runner"),
    ("Triton is not installed", "vLLM CPU: no Triton on CPU"),
    ("Inductor compilation was disabled", "vLLM: enforce_eager is set on purpose (CPU start-up time)"),
    ("Enforce eager set", "vLLM: enforce_eager is set on purpose (CPU start-up time)"),
    ("Reset SSM cache type", "vLLM CPU: concerns Mamba models only"),
    ("does not officially support disabling chunked prefill", "vLLM CPU: off on purpose (seeded sampling)"),
    ("The global random seed is set to", "vLLM in-process engine: the actor's own random state is unused"),
    ("Token authentication is enabled for this Ray cluster", "Ray: a local runtime of this run only"),
    ("Progress bars disabled", "Ray Data: off on purpose, the training bar is the one to watch"),
)
# Python warnings (category, module regex) of library internals that a user cannot act on
QUIET_WARNINGS = (
    (FutureWarning, r"(vllm|torch|transformers)(\.|$)"),
    (DeprecationWarning, r"(ray|vllm|torch|transformers)(\.|$)"),
)
# library loggers that print INFO lines on every run (Ray Data plans, Ray Train set-up, vLLM engine start)
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.util.state", "vllm", "transformers", "peft")


class _BenignFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(text in message for text, _ in BENIGN)


_FILTER = _BenignFilter()


def current_level() -> str:
    """The level this process runs at: set by `configure_logging`, else $SPO_RAY_LOG_LEVEL, else warning."""
    level = os.environ.get(LEVEL_ENV, "warning")
    return level if level in LEVELS else "warning"


def is_quiet() -> bool:
    return current_level() == "warning"


def process_env(level: str | None = None) -> dict[str, str]:
    """Environment for a Ray actor or worker process so that it prints at `level` from its first line."""
    level = level or current_level()
    env = {LEVEL_ENV: level, "VLLM_LOGGING_LEVEL": logging.getLevelName(LEVELS[level])}
    if level == "warning":
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' "Loading weights" bars, one per load
    return env


def configure_logging(level: str | None = None) -> str:
    """Apply `level` (default: current_level()) to this process: library loggers, BENIGN, progress bars."""
    level = level or current_level()
    os.environ.update(process_env(level))
    quiet = level == "warning"
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(LEVELS[level])
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if f"{os.sep}ray{os.sep}" in name and isinstance(
            logger, logging.Logger
        ):  # getLogger(__file__) in Ray Train
            logger.setLevel(LEVELS[level])
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    # lastResort prints what reaches a logger without handlers (Ray's own, once ray.init removed them)
    handlers = [logging.lastResort, *(h for logger in loggers for h in getattr(logger, "handlers", ()))]
    for handler in handlers:
        if handler is not None:
            (handler.addFilter if quiet else handler.removeFilter)(_FILTER)
    if quiet:
        for category, module in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", category=category, module=module)
    if quiet and "vllm.logger" in sys.modules:
        _filter_vllm_warnings()
    elif not quiet:  # a quieter call before (this process, or the parent it inherited the environment from)
        _drop_vllm_filter()
    try:
        from transformers.utils import logging as hf_logging

        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()
    except ImportError:
        pass
    return level


_VLLM_CONFIG_PREFIX = "spo_ray_vllm_logging_"  # the files _filter_vllm_warnings writes


def _filter_vllm_warnings() -> None:
    """vLLM re-creates its handler when an engine starts, from VLLM_LOGGING_CONFIG_PATH if set (its documented
    hook): point that at vLLM's own default config plus the BENIGN filter."""
    import copy
    import json
    import tempfile

    from vllm.logger import DEFAULT_LOGGING_CONFIG

    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config["filters"] = {"spo_ray_benign": {"()": f"{__name__}._BenignFilter"}}
    for name in ("handlers", "loggers"):
        for entry in config[name].values():
            entry["level"] = "WARNING"
    config["handlers"]["vllm"]["filters"] = ["spo_ray_benign"]
    path = os.path.join(tempfile.gettempdir(), f"{_VLLM_CONFIG_PREFIX}{os.getpid()}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path


def _drop_vllm_filter() -> None:
    """Forget the WARNING-level vLLM config `_filter_vllm_warnings` wrote (a user's own config stays): vLLM engines
    started from here, and every child process, would read it and print no INFO line at a louder level."""
    path = os.environ.get("VLLM_LOGGING_CONFIG_PATH", "")
    if os.path.basename(path).startswith(_VLLM_CONFIG_PREFIX):
        del os.environ["VLLM_LOGGING_CONFIG_PATH"]


def ray_logging_config(level: str | None = None):
    """Ray's LoggingConfig for `ray.init` and Ray Train's RunConfig (controller and worker lines)."""
    import ray

    return ray.LoggingConfig(
        encoding="TEXT", log_level=logging.getLevelName(LEVELS[level or current_level()])
    )
