"""The `transformers.generate` fallback engine, for platforms without vLLM; same API and log-probs."""

from __future__ import annotations

from typing import Any

import torch

from spo_ray.errors import UserError
from spo_ray.rollout.engines.base import RawCompletion, RolloutEngine
from spo_ray.rollout.types import SamplingSettings


class RawLogprobRecorder:
    """A logits processor placed first: records log_softmax of the raw logits of each step.

    At step t it sees the tokens chosen up to t-1, so it gathers the log-prob of token t-1 from the
    previous step's row; `finish` gathers the last one. Memory stays at one [rows, vocab] row.
    """

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None  # [rows, vocab] log-probs of the last step
        self.per_step: list[torch.Tensor] = []  # each [rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.per_step.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[rows, steps] log-probs of the chosen tokens."""
        if self.previous is not None:
            self.per_step.append(self.previous.gather(-1, last_tokens[:, None]).squeeze(-1))
        return torch.stack(self.per_step, dim=1)


class HfEngine(RolloutEngine):
    """A transformers causal LM sampled with `generate`; raw-logit log-probs like vLLM's default."""

    model: Any = None
    tokenizer: Any = None

    def start(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        options = dict(self.engine_options)
        dtype = options.pop("dtype", "auto")
        device = options.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
        options.pop("cpu_weights", None)  # rollout.cpu_weights concerns vLLM's CPU engines only
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype, **options)
        except Exception as exc:
            raise UserError(
                f"transformers cannot load the model at {self.model_path}: {type(exc).__name__}: {exc}"
            ) from None
        self.model.to(device).eval()
        torch.manual_seed(self.seed)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = sorted({i for i in [*eos, self.tokenizer.eos_token_id] if i is not None})
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        # A neutral default config, so sampling settings of the model folder cannot leak into `generate`.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)

    def _tokenizer(self) -> Any:
        return self.tokenizer

    def _limits(self) -> tuple[int, int]:
        config = self.model.config
        return config.vocab_size, getattr(config, "max_position_embeddings", 1 << 30)

    def _load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise UserError(
                f"weights do not match the model at {self.model_path}: unexpected {unexpected[:5]}, "
                f"missing {sorted(set(missing) - tied)[:5]}"
            )

    @torch.no_grad()
    def _generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings, seeds: list[int]
    ) -> list[list[RawCompletion]]:
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        # One RNG stream per chunk: reproducible for the same seed and the same split over actors.
        torch.manual_seed(seeds[0])
        device = self.model.device
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):  # left padding
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        recorder = RawLogprobRecorder()
        processors = [recorder]
        greedy = settings.temperature == 0
        if not greedy:
            processors += [TemperatureLogitsWarper(settings.temperature), TopPLogitsWarper(settings.top_p)]
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=1.0,  # applied by our processors, after the recorder saw the raw logits
            top_p=1.0,
            top_k=0,
            max_new_tokens=settings.max_tokens,
            num_return_sequences=settings.n,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        sequences = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
        )
        new_tokens = sequences[:, width:].cpu()  # [prompts * n, steps], prompt-major
        logprobs = recorder.finish(new_tokens[:, -1].to(device)).cpu()
        eos = torch.tensor(self.eos_ids)
        results: list[list[RawCompletion]] = [[] for _ in prompt_ids]
        for row in range(new_tokens.shape[0]):
            tokens = new_tokens[row].tolist()
            stops = torch.isin(new_tokens[row], eos).nonzero()
            length = int(stops[0]) + 1 if len(stops) else len(tokens)
            finish = "stop" if len(stops) else "length"
            results[row // settings.n].append(
                (tokens[:length], logprobs[row, :length].tolist(), finish, None)
            )
        return results
