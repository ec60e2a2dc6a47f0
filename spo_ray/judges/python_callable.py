"""A user's Python function as a scoring judge, run in parallel as Ray tasks.

`judge.callable = "pkg.module:function"` names `function(prompt: str, responses: list[str]) -> list[float]`
(`prompt` is the request's last user message). The function is shipped to the workers by value
(cloudpickle), so a module that only the driver can import (a script folder on its sys.path) works
too. Per request, an exception is counted `error` and bad output (wrong length, not numbers, NaN or
inf) `bad_output`; either leaves that request's scores None, and the first message is a warning and
`last_error`. Requests that miss `judge.timeout_s` are cancelled and counted `timeout`.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable
from typing import Any

import ray
from ray import cloudpickle
from ray.exceptions import RayError

from spo_ray.errors import ConfigError, UserError
from spo_ray.judges.base import (
    Judge,
    Judgement,
    JudgeRequest,
    RequestResult,
    actor_options,
    contiguous_chunks,
)

# What a task returns per request: (scores, failure reason, message); scores None on failure.


def load_callable(spec: str) -> Callable[..., Any]:
    """The function named "pkg.module:function"; ConfigError naming judge.callable when it cannot be had."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            "judge.callable", f"{spec!r} is not of the form 'pkg.module:function' (e.g. 'mypkg.judges:score')"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            "judge.callable",
            f"module '{module_name}' cannot be imported ({type(exc).__name__}: {exc}); install it or put "
            "its folder on PYTHONPATH",
        ) from None
    function = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise ConfigError("judge.callable", f"'{module_name}' has no attribute '{attribute}'")
        function = getattr(function, part)
    if not callable(function):
        raise ConfigError(
            "judge.callable",
            f"'{spec}' is not callable (it is a {type(function).__name__}); name a function "
            "(prompt, responses) -> scores",
        )
    return function


def pickle_by_value(function: Callable[..., Any], module_name: str) -> bytes:
    """cloudpickle bytes of `function` that carry its code, not an import path: its package and every
    module loaded from the same folder (helpers beside it) are pickled by value."""
    names = set(_driver_side_packages(module_name))
    defined_in = getattr(function, "__module__", None)  # `score` may be imported from elsewhere
    if defined_in in sys.modules:
        names.update(_driver_side_packages(defined_in))
    modules = [sys.modules[name] for name in sorted(names)]
    newly = [m for m in modules if m.__name__ not in cloudpickle.list_registry_pickle_by_value()]
    for module in newly:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(function)
    finally:
        for module in newly:
            cloudpickle.unregister_pickle_by_value(module)


def _driver_side_packages(module_name: str) -> list[str]:
    """Top-level names of the callable's package and of the loaded modules beside it (not when the
    package is installed: workers import installed packages themselves)."""
    package = module_name.split(".")[0]
    if package == "spo_ray" or package in sys.builtin_module_names:
        return []
    file = getattr(sys.modules[package], "__file__", None)
    if not file:  # a namespace package
        return [package]
    if _installed(file):
        return []
    root = os.path.dirname(file)
    if os.path.basename(file) == "__init__.py":
        root = os.path.dirname(root)
    names = {package}
    for name, module in list(sys.modules.items()):
        location = getattr(module, "__file__", None) or ""
        beside = "." not in name and name != "spo_ray" and location.startswith(root + os.sep)
        if beside and not _installed(location):  # a virtualenv inside the folder is not the user's code
            names.add(name)
    return sorted(names)


def _installed(path: str) -> bool:
    parts = os.path.abspath(path).split(os.sep)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return "site-packages" in parts or "dist-packages" in parts or any(path.startswith(p) for p in prefixes)


def checked_scores(output: Any, num_responses: int) -> tuple[list[float] | None, str | None]:
    """(scores, None) when `output` is `num_responses` finite numbers (list, tuple, array), else (None, why)."""
    if hasattr(output, "tolist"):  # numpy arrays, torch tensors
        output = output.tolist()
    if not isinstance(output, (list, tuple)):
        return None, f"returned a {type(output).__name__}, not a list of {num_responses} numbers"
    if len(output) != num_responses:
        return None, f"returned {len(output)} scores for {num_responses} responses"
    for value in output:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None, f"returned {value!r} ({type(value).__name__}) among the scores, not a number"
        if not math.isfinite(value):
            return None, f"returned the non-finite score {value!r}"
    return [float(value) for value in output], None


def score_chunk(
    payload: bytes, first_index: int, requests: list[tuple[str, list[str]]]
) -> list[RequestResult]:
    """The Ray task: the user function on each request, failures caught and described per request."""
    function = cloudpickle.loads(payload)
    results: list[RequestResult] = []
    for offset, (prompt, responses) in enumerate(requests):
        where = f"request {first_index + offset}"
        try:
            output = function(prompt, list(responses))
        except Exception as exc:
            results.append((None, "error", f"{where}: {type(exc).__name__}: {exc}"))
            continue
        scores, problem = checked_scores(output, len(responses))
        results.append(
            (scores, None, None) if problem is None else (None, "bad_output", f"{where}: {problem}")
        )
    return results


def load_payload(payload: bytes) -> str | None:
    """None when a worker can rebuild the function, else why not (checked once, at construction)."""
    try:
        cloudpickle.loads(payload)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class PythonJudge(Judge):
    """Scores from `judge.callable` (module docstring): requests split into `num_actors` Ray tasks."""

    output = "scores"

    def __init__(
        self,
        callable_path: str,
        *,
        num_actors: int = 1,
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        timeout_s: float = 600.0,
    ):
        if not callable_path:
            raise ConfigError("judge.callable", "judge.name=python needs 'pkg.module:function'")
        self.callable_path = callable_path
        self.function = load_callable(callable_path)
        if not ray.is_initialized():
            raise UserError("PythonJudge needs a Ray runtime: call ray.init() (or run inside a Ray job)")
        self.num_tasks = num_actors
        self.timeout_s = float(timeout_s)
        self.task = ray.remote(score_chunk).options(num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor)
        try:
            payload = pickle_by_value(self.function, callable_path.partition(":")[0])
        except Exception as exc:
            raise ConfigError(
                "judge.callable",
                f"'{callable_path}' cannot be pickled for Ray workers: {type(exc).__name__}: {exc}",
            ) from None
        self.payload = ray.put(payload)
        problem = ray.get(
            ray.remote(load_payload).options(num_cpus=0).remote(self.payload), timeout=self.timeout_s
        )
        if problem:
            raise ConfigError("judge.callable", f"a Ray worker cannot load '{callable_path}': {problem}")

    @classmethod
    def from_config(cls, cfg, *, task: Any = None) -> PythonJudge:
        """A judge from a JudgeConfig (`task` is unused)."""
        return cls(cfg.callable, **actor_options(cfg))

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """One Judgement per request, in order; failures counted by reason, their scores None."""
        if not requests:
            return []
        chunks = contiguous_chunks(len(requests), self.num_tasks)
        refs = [
            self.task.remote(
                self.payload, chunk.start, [(r.question, list(r.responses)) for r in requests[chunk]]
            )
            for chunk in chunks
        ]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        results: list[RequestResult] = []
        for chunk, ref in zip(chunks, refs):
            size = chunk.stop - chunk.start
            if ref not in ready:
                ray.cancel(ref, force=True)
                message = f"requests {chunk.start}..{chunk.stop - 1}: no answer within judge.timeout_s={self.timeout_s:g} s"
                results += [(None, "timeout", message)] * size
                continue
            try:
                results += ray.get(ref)
            except RayError as exc:  # the worker died (a crash in native code, out of memory)
                results += [(None, "error", f"requests {chunk.start}..{chunk.stop - 1}: {exc}")] * size
        return self.scored_judgements(requests, results)
