"""Chat templates and tokenization: prompt ids, response ids, and the truncation policy (README.md)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

from spo_ray.data.chat_tokenizer import load_chat_tokenizer
from spo_ray.data.schema import Example, RowProblem
from spo_ray.errors import DataError

_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Any:
    """The tokenizer of a model folder (cached per process); DataError if it cannot be used here.

    With tokenizer.json it loads as a plain fast tokenizer: Ray workers skip AutoTokenizer's torch import."""
    try:
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))
    except Exception as exc:  # transformers raises OSError, ValueError, ...; name the path
        raise DataError(f"tokenizer '{path}' could not be loaded ({type(exc).__name__}: {exc})") from None
    return _with_eos(tokenizer, path)


@functools.lru_cache(maxsize=4)
def load_template_tokenizer(path: str) -> Any:
    """What `Templater` tokenizes with (cached per process): a `ChatTokenizer` where transformers would take
    the folder's files as they are, so a Ray worker never imports transformers; else `load_tokenizer`'s."""
    tokenizer = load_chat_tokenizer(path)
    return load_tokenizer(path) if tokenizer is None else _with_eos(tokenizer, path)


def _with_eos(tokenizer: Any, path: str) -> Any:
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer '{path}' has no eos_token: set one in its tokenizer_config.json (responses end with it)"
        )
    return tokenizer


@dataclass
class TokenizedExample:
    """Token ids of one example; ranking as in `Example` (best first)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    ranking: list[int]
    prompt_truncated: bool
    win_probs: list[float] = field(default_factory=list)
    responses_truncated: bool = False  # some response was cut to fit max_length (no eos after the cut)


LONG_ROW_POLICIES = ("truncate", "skip", "error")


class Templater:
    """Canonical examples -> token ids, batched. Prompt: chat template with the generation prompt (or the
    plain fallback `User: ...\nAssistant: `); response: the assistant turn through eos. Prompts are cut
    from the left to max_prompt_length; a response that still does not fit max_length is cut to fit
    (`on_long_rows="truncate"`, keeping its start, as TRL does) or makes the row `too_long`."""

    def __init__(
        self, tokenizer: Any, max_length: int, max_prompt_length: int, on_long_rows: str = "truncate"
    ):
        if on_long_rows not in LONG_ROW_POLICIES:
            raise ValueError(f"on_long_rows must be one of {LONG_ROW_POLICIES}, got {on_long_rows!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.on_long_rows = on_long_rows
        self.eos_id: int = tokenizer.eos_token_id
        self.eos_text: str = tokenizer.eos_token
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        bos = getattr(tokenizer, "bos_token", None)
        self.bos_id = tokenizer.bos_token_id if bos and bos != self.eos_text else None
        self._plain_bos = bos if bos and bos != self.eos_text else ""
        self.anchors = _split_anchors(tokenizer)

    @classmethod
    def from_path(
        cls, path: str, max_length: int, max_prompt_length: int, on_long_rows: str = "truncate"
    ) -> Templater:
        """A Templater over the (cached) tokenizer of a model folder."""
        return cls(load_template_tokenizer(path), max_length, max_prompt_length, on_long_rows)

    def prompt_texts(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """The templated prompts, each ending where the assistant's reply begins (one batched render)."""
        if not conversations:
            return []
        if self.has_template:
            return self.tokenizer.apply_chat_template(
                conversations, tokenize=False, add_generation_prompt=True
            )
        return [self._plain_prompt(messages) for messages in conversations]

    def _plain_prompt(self, messages: list[dict[str, str]]) -> str:
        lines = "".join(f"{_PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in messages)
        return f"{self._plain_bos}{lines}Assistant: "

    def reply_texts(self, examples: list[Example], prompts: list[str]) -> list[list[str | None]]:
        """Per example and response, the assistant turn's text after the prompt (`prompt_texts`), through eos;
        None where the template does not render the conversation as the prompt followed by it."""
        if not self.has_template:
            return [[response + self.eos_text for response in ex.responses] for ex in examples]
        conversations = [
            ex.prompt + [{"role": "assistant", "content": r}] for ex in examples for r in ex.responses
        ]
        fulls = iter(
            self.tokenizer.apply_chat_template(conversations, tokenize=False) if conversations else []
        )
        return [
            [self._reply(next(fulls), prompt) for _ in ex.responses] for ex, prompt in zip(examples, prompts)
        ]

    def _reply(self, full: str, prompt: str) -> str | None:
        if not full.startswith(prompt):
            return None
        reply = full[len(prompt) :]
        end = reply.rfind(self.eos_text)
        return reply[: end + len(self.eos_text)] if end >= 0 else reply

    def _split_full(self, messages: list[dict[str, str]], response: str, prompt_len: int) -> list[int]:
        """Fallback for templates that render the prompt differently: tokenize all, split at prompt length."""
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
        ids = self.token_ids([full])[0][prompt_len:]
        return ids[: len(ids) - ids[::-1].index(self.eos_id)] if self.eos_id in ids else ids

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of texts (no special tokens added), one batched call to the Rust tokenizer."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            if (
                backend.truncation is not None or backend.padding is not None
            ):  # set in some tokenizer.json files
                backend.no_truncation()
                backend.no_padding()
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
            return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def truncate_prompt(self, ids: list[int]) -> tuple[list[int], bool]:
        """Keep the last `max_prompt_length` tokens (and a leading bos)."""
        if len(ids) <= self.max_prompt_length:
            return ids, False
        if self.bos_id is not None and ids[0] == self.bos_id and self.max_prompt_length > 1:
            return [ids[0]] + ids[len(ids) - self.max_prompt_length + 1 :], True
        return ids[len(ids) - self.max_prompt_length :], True

    def encode_prompts(self, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
        """Templated prompt ids (generation prompt added), truncated from the left."""
        encoded = self.token_ids(self.prompt_texts(prompts))
        return [self.truncate_prompt(ids)[0] for ids in encoded]

    def encode(self, examples: list[Example]) -> list[TokenizedExample | RowProblem]:
        """Token ids for each example, or the RowProblem (too_long) that keeps it out."""
        if not examples:
            return []
        prompts = self.prompt_texts([ex.prompt for ex in examples])
        replies = self.reply_texts(examples, prompts)
        prompt_ids = self.token_ids(prompts)
        reply_ids = iter(self._reply_ids(prompts, prompt_ids, replies))
        out: list[TokenizedExample | RowProblem] = []
        for ex, p_ids, rs in zip(examples, prompt_ids, replies):
            responses = [
                next(reply_ids) if reply is not None else self._split_full(ex.prompt, response, len(p_ids))
                for response, reply in zip(ex.responses, rs)
            ]
            responses = [r if r and r[-1] == self.eos_id else r + [self.eos_id] for r in responses]
            kept, truncated = self.truncate_prompt(p_ids)
            out.append(self._fit(ex, kept, responses, truncated, len(p_ids)))
        return out

    def _reply_ids(
        self, prompts: list[str], prompt_ids: list[list[int]], replies: list[list[str | None]]
    ) -> list[list[int]]:
        """Per reply (in order, None skipped): the ids that follow the prompt's when prompt + reply is
        tokenized whole, or the reply's own ids where a token merges across that boundary.

        The tokenizer splits its input at special tokens before it normalizes and pre-tokenizes each piece,
        so the ids after a special token do not depend on the text before it: prompt + reply is tokenized
        from the prompt's last special token on (its `head`, e.g. `<|im_start|>assistant\n`), not from the
        start, and the prompt is tokenized once per row instead of once per response. A head whose ids are
        not the end of the prompt's ids (the split does not hold there) falls back to the whole prompt."""
        heads = [prompt[self._anchor_start(prompt) :] for prompt in prompts]
        distinct = sorted({h for h, p in zip(heads, prompts) if len(h) < len(p)})  # the whole prompt: as is
        head_ids = dict(zip(distinct, self.token_ids(distinct) if distinct else []))
        texts, skip = [], []
        for prompt, p_ids, head, rs in zip(prompts, prompt_ids, heads, replies):
            ids = head_ids.get(head)
            if not ids or len(ids) > len(p_ids) or p_ids[len(p_ids) - len(ids) :] != ids:
                head, ids = prompt, p_ids
            for reply in rs:
                if reply is not None:
                    texts.append((head, reply))
                    skip.append(ids)
        encoded = self.token_ids([head + reply for head, reply in texts]) if texts else []
        out = []
        for (_, reply), ids, full in zip(texts, skip, encoded):
            if full[: len(ids)] == ids:
                out.append(full[len(ids) :])
            else:  # a token merged across the boundary: tokenize the reply alone
                out.append(self.token_ids([reply])[0])
        return out

    def _anchor_start(self, prompt: str) -> int:
        """Where the prompt's last split anchor (see `_split_anchors`) starts; 0 if it has none."""
        return max([0, *(prompt.rfind(anchor) for anchor in self.anchors)])  # rfind: -1 when absent

    def _fit(
        self, ex: Example, prompt: list[int], responses: list[list[int]], truncated: bool, full_len: int
    ) -> TokenizedExample | RowProblem:
        room = self.max_length - len(prompt)  # > 0: max_prompt_length < max_length
        longest = max(range(len(responses)), key=lambda i: len(responses[i]))
        cut_responses = False
        if len(responses[longest]) > room:
            if self.on_long_rows != "truncate":
                cut = f" (cut from {full_len})" if truncated else ""
                return RowProblem(
                    ex.response_fields[longest],
                    "too_long",
                    f"prompt {len(prompt)} tokens{cut} + response {len(responses[longest])} tokens = "
                    f"{len(prompt) + len(responses[longest])} > data.max_length={self.max_length} "
                    f"(data.on_long_rows={self.on_long_rows}); raise data.max_length, or set "
                    "data.on_long_rows=truncate to cut responses to fit",
                )
            responses = [r[:room] for r in responses]
            cut_responses = True
            seen: dict[tuple[int, ...], int] = {}
            for i, ids in enumerate([] if ex.win_probs else responses):  # self-play rows may repeat
                j = seen.setdefault(tuple(ids), i)
                if j != i:  # the pair would compare a response with itself: no preference left
                    return RowProblem(
                        ex.response_fields[i],
                        "identical_after_truncation",
                        f"its first {room} tokens equal those of {ex.response_fields[j]}, the room "
                        f"data.max_length={self.max_length} leaves after the {len(prompt)}-token prompt; "
                        "raise data.max_length or lower data.max_prompt_length",
                    )
        return TokenizedExample(
            prompt, responses, list(ex.ranking), truncated, list(ex.win_probs), cut_responses
        )


def _split_anchors(tokenizer: Any) -> tuple[str, ...]:
    """The special tokens the Rust tokenizer always splits its input at, matched on the raw text (not
    normalized, not single-word) and contained in no other added token: tokenization restarts after each
    (`Templater._reply_ids`). Empty for tokenizers without a Rust backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        return ()
    added = [token for token in backend.get_added_tokens_decoder().values() if token.content]
    contents = [token.content for token in added]
    return tuple(
        token.content
        for token in added
        if token.special
        and not token.normalized
        and not token.single_word
        and sum(token.content in other for other in contents) == 1
    )
