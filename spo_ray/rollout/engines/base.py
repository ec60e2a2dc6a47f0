"""What every rollout engine does inside its Ray actor: encode prompts, generate, reload weights."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import torch

from spo_ray.errors import UserError
from spo_ray.rollout.serialization import buckets_to_state_dict
from spo_ray.rollout.types import Prompt, Sample, SamplingSettings

# (token_ids, logprobs, finish_reason, text or None to decode here), one list per prompt.
RawCompletion = tuple[list[int], list[float], str, "str | None"]


def encode_prompts(tokenizer: Any, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids per prompt: ids pass through; text and messages are templated by the data pipeline's
    `Templater` (chat template + generation prompt, or its plain fallback), never truncated here."""
    from spo_ray.data.templating import Templater

    conversations = {
        i: [{"role": "user", "content": p}] if isinstance(p, str) else p
        for i, p in enumerate(prompts)
        if not (isinstance(p, list) and p and isinstance(p[0], int))
    }
    encoded: dict[int, list[int]] = {}
    if conversations:
        templater = Templater(tokenizer, max_length=1 << 30, max_prompt_length=1 << 30)
        encoded = dict(zip(conversations, templater.encode_prompts(list(conversations.values()))))
    return [encoded[i] if i in encoded else list(p) for i, p in enumerate(prompts)]


class RolloutEngine(ABC):
    """One generation engine in one Ray actor; the manager calls these methods remotely.

    `policy_version` is the version of the weights loaded last (0: the weights in `model_path`);
    every sample is stamped with it, and the actor runs one call at a time, so stamps are exact.
    """

    def __init__(self, model_path: str, seed: int, engine_options: dict[str, Any]):
        self.model_path = model_path
        self.seed = seed
        self.engine_options = dict(engine_options)
        self.policy_version = 0
        self.prompts_served = 0

    # -- implemented by each backend ------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Load the model; raise UserError when this engine cannot serve it."""

    @abstractmethod
    def _tokenizer(self) -> Any: ...

    @abstractmethod
    def _limits(self) -> tuple[int, int]:
        """(vocabulary size, max tokens of prompt + response)."""

    @abstractmethod
    def _load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy `state_dict` (tensors viewing the object store's shared memory) into the served model."""

    @abstractmethod
    def _generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings, seeds: list[int]
    ) -> list[list[RawCompletion]]: ...

    # -- remote API -----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Process id, node, loaded version and prompts served (for monitoring, tests and `os.kill`)."""
        import ray

        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "policy_version": self.policy_version,
            "prompts_served": self.prompts_served,
        }

    def _load_adapter(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], version: int) -> None:
        """Serve this LoRA adapter (PEFT names and config) on top of the loaded weights from now on."""
        raise UserError(
            f"the {type(self).__name__} rollout backend cannot serve LoRA adapters; set rollout.lora_sync=merged"
        )

    def _drop_adapter(self) -> None:  # noqa: B027 (backends without adapters have none to drop)
        """Stop serving the LoRA adapter, if any: new full weights replace the model."""

    def load_weights(self, buckets: list[Any], version: int, lora: dict[str, Any] | None = None) -> int:
        """Serve the weights in `buckets` (object refs of `state_dict_to_buckets` buckets; none: keep the
        loaded ones) and then the LoRA adapter `lora` (`{"refs", "config"}`) from now on, stamped `version`.
        The buckets are mapped from this node's object store, not copied."""
        import ray

        try:
            if buckets:
                self._load_state_dict(buckets_to_state_dict(ray.get(list(buckets))))
            if lora is not None:
                tensors = buckets_to_state_dict(ray.get(list(lora["refs"])))
                self._load_adapter(tensors, lora["config"], version)
            elif buckets:
                self._drop_adapter()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"weights of version {version} do not fit the rollout model at {self.model_path}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        self.policy_version = version
        return version

    def set_policy_version(self, version: int) -> None:
        """Record a version whose weights arrived by another path (a GPU transport)."""
        self.policy_version = version

    def generate(
        self, prompts: list[Prompt], settings: SamplingSettings, seeds: list[int]
    ) -> list[list[Sample]]:
        """Sample `settings.n` responses per prompt; prompt i samples with seed `seeds[i]`."""
        tokenizer = self._tokenizer()
        vocab_size, max_len = self._limits()
        prompt_ids = encode_prompts(tokenizer, prompts)
        for i, ids in enumerate(prompt_ids):
            if max(ids) >= vocab_size:
                raise UserError(
                    f"prompt {i}: token id {max(ids)} is outside the vocabulary (size {vocab_size})"
                )
            if len(ids) + settings.max_tokens > max_len:
                raise UserError(
                    f"prompt {i}: {len(ids)} prompt tokens + max_tokens={settings.max_tokens} exceed the "
                    f"engine's max length {max_len}; shorten the prompt or lower max_tokens"
                )
        raw = self._generate(prompt_ids, settings, seeds)
        self.prompts_served += len(prompts)
        return [
            [
                Sample(
                    prompt=prompt,
                    prompt_token_ids=ids,
                    token_ids=list(tokens),
                    logprobs=[float(x) for x in logprobs],
                    text=text if text is not None else tokenizer.decode(tokens, skip_special_tokens=True),
                    finish_reason=finish,
                    policy_version=self.policy_version,
                )
                for tokens, logprobs, finish, text in completions
            ]
            for prompt, ids, completions in zip(prompts, prompt_ids, raw)
        ]
