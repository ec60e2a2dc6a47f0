"""Values that cross the rollout boundary: prompts, sampling settings, samples, errors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Union

from spo_ray.errors import UserError

# A prompt is a string (the chat template is applied), chat messages, or token ids (used as given).
Prompt = Union[str, list[dict[str, Any]], list[int]]  # noqa: UP007 (a runtime alias on Python 3.10)

MAX_SAMPLES_PER_PROMPT = 1024  # per-prompt seeds are spaced this far apart (vLLM seeds child i with seed + i)


class RolloutError(RuntimeError):
    """The rollout actors could not produce a result in time (dead, hung, or replaced too often)."""


def raise_cause(exc: Exception) -> None:
    """Re-raise the exception a remote call raised (a RayTaskError's cause), without Ray's wrapper."""
    from ray.exceptions import RayTaskError

    cause = exc
    while isinstance(cause, RayTaskError) and cause.cause is not None:
        cause = cause.cause
    raise cause from None


@dataclass
class Sample:
    """One generated response; `logprobs[i]` is the raw model log-prob of `token_ids[i]`."""

    prompt: Prompt
    prompt_token_ids: list[int]
    token_ids: list[int]  # ends with the eos token when finish_reason == "stop"
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (eos) or "length" (max_tokens)
    policy_version: int  # the `version` of the last weight sync the generating engine had loaded


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling parameters of one generate call, checked before anything is sent to an actor."""

    n: int = 1
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> UserError:
            return UserError(f"sampling parameter {name}={getattr(self, name)!r} is out of range: {rule}")

        for name in ("n", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
        if not 1 <= self.n <= MAX_SAMPLES_PER_PROMPT:
            raise bad("n", f"must be between 1 and {MAX_SAMPLES_PER_PROMPT}")
        if self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise bad("temperature", "must be a number")
        if not 0 <= self.temperature <= 100:
            raise bad("temperature", "must be between 0 (greedy) and 100")
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0 < self.top_p <= 1
        ):
            raise bad("top_p", "must be in (0, 1]")


def check_prompts(prompts: Any) -> list[Prompt]:
    """Check the shape of a prompt list (strings, chat message lists, or token-id lists)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise UserError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    checked: list[Prompt] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            checked.append(prompt)
            continue
        if isinstance(prompt, tuple):
            prompt = list(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            if not all("role" in m and "content" in m for m in prompt):
                raise UserError(f"prompts[{i}]: chat messages need 'role' and 'content' keys")
            checked.append(prompt)
            continue
        if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
            checked.append([int(t) for t in prompt])
            continue
        raise UserError(
            f"prompts[{i}] must be a string, a non-empty list of chat messages, or a non-empty list of "
            f"token ids >= 0; got {str(prompt)[:80]!r}"
        )
    return checked


def _is_token_id(value: Any) -> bool:
    return not isinstance(value, bool) and hasattr(value, "__index__") and int(value) >= 0


def derive_seed(base_seed: int, call_seed: int, prompt_index: int) -> int:
    """The sampling seed of one prompt of one call: reproducible, distinct across calls and prompts."""
    digest = hashlib.blake2b(f"{base_seed}:{call_seed}:{prompt_index}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "little") * MAX_SAMPLES_PER_PROMPT  # < 2**58; children add 0..n-1
