"""A Hugging Face sequence-classification model as a scoring judge, served by Ray actors.

Each of `judge.num_actors` actors loads the model from `judge.model_path` and scores prompt + response
texts in batches of `judge.batch_size`. The score of one text is

    num_labels == 1:  logit[0]                (a Bradley–Terry reward model, TRL's RewardTrainer)
    num_labels >= 2:  logit[1] − logit[0]     (log-odds of label 1, "good", against label 0, "bad")

so `Judgement.preference(i, j) = σ(s_i − s_j)` is the Bradley–Terry probability in both cases.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from spo_ray.errors import ConfigError, UserError
from spo_ray.judges.base import (
    Judge,
    Judgement,
    JudgeRequest,
    RequestResult,
    actor_options,
    contiguous_chunks,
)

_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}

# What an actor returns per request: (scores, failure reason, error message); scores None on failure.


def reward_model_text(tokenizer: Any, prompt: list[dict[str, str]], response: str) -> str:
    """The conversation the reward model reads: prompt messages + the assistant response, in the
    tokenizer's chat template, or `User: ...\\nAssistant: ...` lines when it has none."""
    messages = [*prompt, {"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{_PLAIN_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def reward_model_ids(
    tokenizer: Any, prompt: list[dict[str, str]], response: str, max_length: int
) -> list[int]:
    """Token ids of `reward_model_text`, cut from the left to `max_length`. A chat template writes its
    own special tokens; the plain fallback gets the tokenizer's (e.g. BERT's [CLS] ... [SEP])."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    text = reward_model_text(tokenizer, prompt, response)
    ids = tokenizer(text, add_special_tokens=not has_template)["input_ids"]
    return ids[-max_length:]


def check_reward_model_folder(model_path: str) -> None:
    """ConfigError naming judge.model_path unless it is a folder holding a sequence-classification model."""
    if not model_path:
        raise ConfigError("judge.model_path", "judge.name=reward_model needs the reward model's folder")
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isdir(model_path) or not os.path.isfile(config_file):
        raise ConfigError(
            "judge.model_path",
            f"'{model_path}' is not a Hugging Face model folder (no config.json; cwd: {os.getcwd()})",
        )
    architectures = json.loads(Path(config_file).read_text()).get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ConfigError(
            "judge.model_path",
            f"'{model_path}' holds {architectures or 'no architectures'}, not a sequence-classification "
            "model (its config.json must list a *ForSequenceClassification architecture); save the reward "
            "model with AutoModelForSequenceClassification.save_pretrained",
        )


class RewardModelScorer:
    """One copy of the reward model, inside a Ray actor. Loading errors are kept for `ready()`."""

    def __init__(self, model_path: str, batch_size: int, max_length: int, use_gpu: bool):
        self.batch_size = batch_size
        self.max_length = max_length
        self.load_error: str | None = None
        try:
            self._load(model_path, use_gpu)
        except Exception as exc:  # reported by ready(), with the path, on the driver
            self.load_error = f"{type(exc).__name__}: {exc}"

    def _load(self, model_path: str, use_gpu: bool) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("num_gpus_per_actor > 0 but this actor sees no CUDA device")
        self.device = "cuda" if use_gpu else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype="auto", local_files_only=True
        )
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        if model.config.get_text_config().pad_token_id is None:  # HF finds the last token by pad id
            model.config.get_text_config().pad_token_id = self.pad_id
        self.pad_id = model.config.get_text_config().pad_token_id
        self.model = model.to(self.device).eval()
        self.num_labels = model.config.num_labels

    def ready(self) -> str | None:
        """None when the model is loaded, else why it could not be."""
        return self.load_error

    def _forward(self, sequences: list[list[int]]) -> list[float]:
        """Scores of token sequences, right-padded into one batch (positions start at 0 in every row)."""
        import torch

        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        with torch.no_grad():
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits.float()  # [batch, num_labels]
        scores = logits[:, 0] if self.num_labels == 1 else logits[:, 1] - logits[:, 0]
        return scores.cpu().tolist()

    def score(self, requests: list[tuple[list[dict[str, str]], list[str]]]) -> list[RequestResult]:
        """(scores, None, None) per request, or (None, reason, message) when it could not be scored.

        A batch that raises is scored again one text at a time, so only the requests whose own texts
        fail are lost."""
        encoded: dict[int, list[list[int]]] = {}
        failed: dict[int, tuple[str, str]] = {}
        for r, (prompt, responses) in enumerate(requests):
            try:
                encoded[r] = [reward_model_ids(self.tokenizer, prompt, y, self.max_length) for y in responses]
            except Exception as exc:
                failed[r] = ("error", f"formatting request {r}: {type(exc).__name__}: {exc}")
        items = [(r, k) for r, texts in encoded.items() for k in range(len(texts))]
        scores = {r: [math.nan] * len(texts) for r, texts in encoded.items()}
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            try:
                values = self._forward([encoded[r][k] for r, k in batch])
            except Exception:
                values = [self._score_alone(encoded[r][k], r, failed) for r, k in batch]
            for (r, k), value in zip(batch, values):
                scores[r][k] = value
        results: list[RequestResult] = []
        for r in range(len(requests)):
            if r in failed:
                results.append((None, *failed[r]))
            elif not all(math.isfinite(s) for s in scores[r]):
                results.append((None, "non_finite", f"request {r}: the model gave a non-finite score"))
            else:
                results.append((scores[r], None, None))
        return results

    def _score_alone(self, ids: list[int], r: int, failed: dict[int, tuple[str, str]]) -> float:
        try:
            return self._forward([ids])[0]
        except Exception as exc:
            failed.setdefault(r, ("error", f"request {r}: {type(exc).__name__}: {exc}"))
            return math.nan


class RewardModelJudge(Judge):
    """Scores from a sequence-classification reward model (module docstring), in Ray actors."""

    output = "scores"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        num_actors: int = 1,
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        batch_size: int = 16,
        max_length: int = 512,
        timeout_s: float = 600.0,
    ):
        self.model_path = os.path.abspath(os.fspath(model_path)) if model_path else ""
        check_reward_model_folder(self.model_path)
        if not ray.is_initialized():
            raise UserError("RewardModelJudge needs a Ray runtime: call ray.init() (or run inside a Ray job)")
        self.timeout_s = float(timeout_s)
        actor_class = ray.remote(RewardModelScorer).options(
            num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor
        )
        self.actors = [
            actor_class.remote(self.model_path, batch_size, max_length, num_gpus_per_actor > 0)
            for _ in range(num_actors)
        ]
        try:
            errors = self._get([actor.ready.remote() for actor in self.actors], "loading the reward model")
        except BaseException:
            self.close()
            raise
        if any(errors):
            self.close()
            raise ConfigError(
                "judge.model_path",
                f"the reward model at '{self.model_path}' could not be loaded: {next(e for e in errors if e)}",
            )

    @classmethod
    def from_config(cls, cfg, *, task: Any = None) -> RewardModelJudge:
        """A judge from a JudgeConfig (`task` is unused)."""
        return cls(cfg.model_path, batch_size=cfg.batch_size, max_length=cfg.max_length, **actor_options(cfg))

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """Requests split into contiguous chunks, one per actor; results in request order."""
        if not self.actors:
            raise UserError("RewardModelJudge.judge called after close()")
        chunks = contiguous_chunks(len(requests), len(self.actors))
        refs = [
            actor.score.remote([(r.prompt, list(r.responses)) for r in requests[chunk]])
            for actor, chunk in zip(self.actors, chunks)
        ]
        results = [result for part in self._get(refs, "scoring") for result in part]
        return self.scored_judgements(requests, results)

    def _get(self, refs: list[ray.ObjectRef], what: str) -> list[Any]:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError:
            raise UserError(
                f"reward model judge: {what} took longer than judge.timeout_s={self.timeout_s:g} s; raise it "
                "or add actors (judge.num_actors)"
            ) from None
        except RayError as exc:
            raise UserError(f"reward model judge: an actor failed while {what}: {exc}") from None

    def close(self) -> None:
        """Kill the actors."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
