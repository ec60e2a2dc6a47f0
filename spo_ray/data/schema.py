"""Row normalization: the six preference formats into one canonical example, with precise reasons."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Reason codes (the keys of bad-row counts) and the words a person reads.
REASONS: dict[str, str] = {
    "invalid_json": "invalid JSON",
    "invalid_utf8": "invalid UTF-8",
    "invalid_csv": "malformed CSV row",
    "missing_field": "missing field",
    "wrong_type": "wrong type",
    "empty": "empty prompt or response",
    "identical_responses": "chosen identical to rejected",
    "unknown_role": "unknown role",
    "bad_ranking": "ranking is not a list of distinct response indices",
    "no_preference": "no preferred response (the best scores tie)",
    "bad_transcript": "transcript cannot be split into prompt and responses",
    "wrong_count": "number of responses differs from the dataset's",
    "too_long": "too long for data.max_length",
    "identical_after_truncation": "responses identical once cut to data.max_length",
    "bad_dimension": "no usable preference dimension label",
}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
FORMATS = ("explicit", "conversational", "implicit", "sharegpt", "binarized", "nary")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class RowProblem(Exception):
    """Why one row cannot be used: the field (e.g. `prompt[1].role`), a reason code of REASONS, a detail."""

    def __init__(self, field: str, reason: str, detail: str):
        self.field, self.reason, self.detail = field, reason, detail
        super().__init__(f"{field}: {REASONS[reason]}: {detail}")


@dataclass
class Example:
    """The canonical schema every format becomes: prompt messages, n responses, best first.

    Responses are stored in preference order, whatever order the source listed them in, so column 0 is the
    best (a pairwise loss's chosen) for every consumer. `ranking` = [0, 1, ..., k−1]: the top k responses are
    ranked (k = n: a full ranking; k = 1: best-of-n; the rest rank below them, unordered); [] for SPPO's
    self-play rows, which carry `win_probs` instead. `response_fields`: each response's source field
    (`responses[1]`), so later problems (too_long) and `data inspect` can name it."""

    prompt: list[dict[str, str]]
    responses: list[str]
    ranking: list[int]
    response_fields: list[str]
    format: str = ""
    scores: list[float] = field(default_factory=list)
    win_probs: list[float] = field(default_factory=list)  # SPPO: judge's P̂(y ≻ π_t | x) per response

    def to_dict(self) -> dict[str, Any]:
        """Plain data for printing (format, prompt, responses, ranking, scores if any)."""
        out = {
            "format": self.format,
            "prompt": self.prompt,
            "responses": self.responses,
            "ranking": self.ranking,
        }
        out |= {"scores": self.scores} if self.scores else {}
        return out | ({"win_probs": self.win_probs} if self.win_probs else {})


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(row: dict, names: tuple[str, ...], fmt: str) -> None:
    for name in names:
        if name not in row or row[name] is None:
            have = ", ".join(sorted(map(str, row))) or "none"
            raise RowProblem(
                name, "missing_field", f"format '{fmt}' needs {', '.join(names)}; this row has keys: {have}"
            )


def _text(value: Any, where: str, what: str = "response") -> str:
    if not isinstance(value, str):
        raise RowProblem(where, "wrong_type", f"expected a string, got {_kind(value)}")
    if not value.strip():
        raise RowProblem(where, "empty", f"the {what} is empty")
    return value


def _message(value: Any, where: str, roles: dict[str, str] | None = None) -> dict[str, str]:
    """One {role, content} message (or ShareGPT {from, value} when `roles` maps ShareGPT names)."""
    role_key, content_key = ("from", "value") if roles else ("role", "content")
    if not isinstance(value, dict):
        raise RowProblem(where, "wrong_type", f"expected a message object, got {_kind(value)}")
    for key in (role_key, content_key):
        if key not in value:
            raise RowProblem(
                f"{where}.{key}", "missing_field", f"a message needs '{role_key}' and '{content_key}'"
            )
    role, content = value[role_key], value[content_key]
    if not isinstance(role, str):
        raise RowProblem(f"{where}.{role_key}", "wrong_type", f"expected a string, got {_kind(role)}")
    known = roles or {r: r for r in ROLES}
    if role not in known:
        raise RowProblem(
            f"{where}.{role_key}", "unknown_role", f"'{role}' is not one of {', '.join(sorted(known))}"
        )
    if not isinstance(content, str):
        raise RowProblem(f"{where}.{content_key}", "wrong_type", f"expected a string, got {_kind(content)}")
    return {"role": known[role], "content": content}


def _messages(value: Any, where: str, roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowProblem(where, "wrong_type", f"expected a list of messages, got {_kind(value)}")
    if not value:
        raise RowProblem(where, "empty", "the message list is empty")
    return [_message(item, f"{where}[{i}]", roles) for i, item in enumerate(value)]


def _check_prompt(messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    if not any(m["content"].strip() for m in messages):
        raise RowProblem(where, "empty", "the prompt has no text")
    return messages


def _reply(messages: list[dict[str, str]], where: str) -> str:
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowProblem(
            f"{where}[{len(messages) - 1}].role",
            "bad_transcript",
            f"the last message must be the assistant's reply, got '{last['role']}'",
        )
    return _text(last["content"], f"{where}[{len(messages) - 1}].content")


def _distinct(responses: list[str], fields: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, text in enumerate(responses):
        j = seen.setdefault(text.strip(), i)
        if j != i:
            raise RowProblem(fields[i], "identical_responses", f"the same text as {fields[j]}")


def _pair_from_messages(prefix: list[dict[str, str]], row: dict, fmt: str) -> Example:
    """chosen/rejected message lists (or reply strings): shared leading messages join the prompt."""
    chosen, rejected = (
        [{"role": "assistant", "content": row[name]}]
        if isinstance(row[name], str)
        else _messages(row[name], name)
        for name in ("chosen", "rejected")
    )
    replies = [_reply(chosen, "chosen"), _reply(rejected, "rejected")]
    if chosen[:-1] != rejected[:-1]:
        raise RowProblem(
            "rejected", "bad_transcript", "chosen and rejected differ before their last assistant message"
        )
    prompt = _check_prompt(prefix + chosen[:-1], "prompt")
    _distinct(replies, ["chosen", "rejected"])
    return Example(prompt, replies, [0, 1], ["chosen", "rejected"], fmt)


def normalize_explicit(row: dict) -> Example:
    """{prompt: str, chosen: str, rejected: str}; the prompt becomes one user message."""
    _require(row, ("prompt", "chosen", "rejected"), "explicit")
    prompt = _text(row["prompt"], "prompt", "prompt")
    replies = [_text(row["chosen"], "chosen"), _text(row["rejected"], "rejected")]
    _distinct(replies, ["chosen", "rejected"])
    return Example([{"role": "user", "content": prompt}], replies, [0, 1], ["chosen", "rejected"], "explicit")


def normalize_conversational(row: dict) -> Example:
    """{prompt: [messages], chosen: [assistant message(s)], rejected: [...]}."""
    _require(row, ("prompt", "chosen", "rejected"), "conversational")
    return _pair_from_messages(_messages(row["prompt"], "prompt"), row, "conversational")


def _hh_messages(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> messages; text before the first turn becomes a system message."""
    parts = _HH_TURN.split(text)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def normalize_implicit(row: dict) -> Example:
    """Full transcripts in chosen/rejected (Anthropic HH); the prompt is the shared prefix to the last reply."""
    _require(row, ("chosen", "rejected"), "implicit")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) or isinstance(rejected, list):
        return _pair_from_messages([], row, "implicit")
    chosen, rejected = _text(chosen, "chosen", "transcript"), _text(rejected, "rejected", "transcript")
    if chosen.startswith("Human:"):
        chosen = "\n\n" + chosen
    if rejected.startswith("Human:"):
        rejected = "\n\n" + rejected
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(ASSISTANT, 0, shared)
    if cut < 0:
        raise RowProblem(
            "chosen",
            "bad_transcript",
            f"no '{ASSISTANT.strip()}' turn in the prefix chosen and rejected share",
        )
    replies = [chosen[cut + len(ASSISTANT) :].strip(), rejected[cut + len(ASSISTANT) :].strip()]
    for name, reply in zip(("chosen", "rejected"), replies):
        if HUMAN in reply or ASSISTANT in reply:
            raise RowProblem(
                name, "bad_transcript", "chosen and rejected differ before their last assistant turn"
            )
        _text(reply, name)
    prompt = _hh_messages(chosen[:cut])
    if not prompt:
        raise RowProblem("chosen", "empty", "the transcript has no turn before the last assistant reply")
    _check_prompt(prompt, "chosen")
    _distinct(replies, ["chosen", "rejected"])
    return Example(prompt, replies, [0, 1], ["chosen", "rejected"], "implicit")


def normalize_sharegpt(row: dict) -> Example:
    """{conversations: [{from, value}], chosen: {from: gpt, value}, rejected: {...}}, system turns included."""
    _require(row, ("conversations", "chosen", "rejected"), "sharegpt")
    prompt = _check_prompt(_messages(row["conversations"], "conversations", SHAREGPT_ROLES), "conversations")
    replies = []
    for name in ("chosen", "rejected"):
        value = row[name]
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        message = _message(value, name, SHAREGPT_ROLES)
        if message["role"] != "assistant":
            raise RowProblem(f"{name}.from", "unknown_role", "a response must come from 'gpt'")
        replies.append(_text(message["content"], f"{name}.value"))
    _distinct(replies, ["chosen.value", "rejected.value"])
    return Example(prompt, replies, [0, 1], ["chosen.value", "rejected.value"], "sharegpt")


def normalize_binarized(row: dict) -> Example:
    """{prompt: str, chosen: [user, assistant], rejected: [...], score_chosen, score_rejected}."""
    _require(row, ("prompt", "chosen", "rejected"), "binarized")
    prompt = _text(row["prompt"], "prompt", "prompt")
    scores = []
    for name in ("score_chosen", "score_rejected"):
        value = row.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RowProblem(name, "wrong_type", f"expected a number, got {_kind(value)}")
            scores.append(float(value))
    chosen = row["chosen"]
    has_context = isinstance(chosen, list) and len(chosen) > 1
    prefix = [] if has_context else [{"role": "user", "content": prompt}]
    example = _pair_from_messages(prefix, row, "binarized")
    example.scores = scores if len(scores) == 2 else []
    return example


def _ranking_from(row: dict, n: int) -> list[int]:
    """The top-k response indices, best first: a given `ranking`, or the order of `scores` up to the first tie."""
    if row.get("ranking") is not None:
        ranking = row["ranking"]
        if not isinstance(ranking, list) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in ranking
        ):
            raise RowProblem("ranking", "wrong_type", f"expected a list of integers, got {ranking!r:.80}")
        if not ranking or len(set(ranking)) != len(ranking) or not all(0 <= i < n for i in ranking):
            raise RowProblem(
                "ranking",
                "bad_ranking",
                f"{ranking!r:.80} must list distinct indices of the {n} responses, best first: all of them, "
                "or the top k ([best] for best-of-n)",
            )
        return list(ranking)
    if row.get("scores") is not None:
        scores = row["scores"]
        if not isinstance(scores, list) or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) for s in scores
        ):
            raise RowProblem("scores", "wrong_type", f"expected a list of numbers, got {scores!r:.80}")
        if len(scores) != n:
            raise RowProblem("scores", "bad_ranking", f"{len(scores)} scores for {n} responses")
        order = sorted(range(n), key=lambda i: -scores[i])
        # ranked while strictly better than the next: ties end the ranking (their order would be arbitrary)
        k = 0
        while k < n - 1 and scores[order[k]] > scores[order[k + 1]]:
            k += 1
        if k == 0:
            raise RowProblem("scores", "no_preference", f"the best scores tie ({scores!r:.80})")
        return order if k == n - 1 else order[:k]
    raise RowProblem("ranking", "missing_field", "format 'nary' needs 'ranking' (best first) or 'scores'")


def parse_prompt(value: Any, where: str = "prompt") -> list[dict[str, str]]:
    """A prompt given as a string (one user message) or as a list of messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, where, "prompt")}]
    return _check_prompt(_messages(value, where), where)


def _win_probs(row: dict, n: int) -> list[float]:
    value = row["win_probs"]
    if not isinstance(value, list) or any(
        isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0 for p in value
    ):
        raise RowProblem(
            "win_probs", "wrong_type", f"expected a list of probabilities in [0, 1], got {value!r:.80}"
        )
    if len(value) != n:
        raise RowProblem("win_probs", "wrong_count", f"{len(value)} win_probs for {n} responses")
    return [float(p) for p in value]


def normalize_nary(row: dict) -> Example:
    """{prompt, responses: [...], ranking: [best first]} or {prompt, responses, scores}; or SPPO's
    {prompt, responses, win_probs}: samples of π_t (repeats allowed) with P̂(y ≻ π_t | x) each."""
    _require(row, ("prompt", "responses"), "nary")
    prompt = parse_prompt(row["prompt"])
    items = row["responses"]
    if not isinstance(items, list):
        raise RowProblem("responses", "wrong_type", f"expected a list, got {_kind(items)}")
    if len(items) < 2:
        raise RowProblem("responses", "wrong_count", f"needs at least 2 responses, got {len(items)}")
    fields = [f"responses[{i}]" for i in range(len(items))]
    replies = [
        _text(item, where) if isinstance(item, str) else _reply(_messages(item, where), where)
        for item, where in zip(items, fields)
    ]
    if row.get("win_probs") is not None:  # self-play samples: a repeat is a sample drawn twice, no ranking
        win_probs = _win_probs(row, len(items))
        return Example(prompt, replies, [], fields, "nary", win_probs=win_probs)
    ranking = _ranking_from(row, len(items))
    _distinct(replies, fields)
    scores = [float(s) for s in row["scores"]] if row.get("ranking") is None else []
    # best first: the ranked responses in rank order, then the unranked ones in the order given
    order = ranking + [i for i in range(len(items)) if i not in ranking]
    return Example(
        prompt,
        [replies[i] for i in order],
        list(range(len(ranking) if len(ranking) < len(items) - 1 else len(items))),
        [fields[i] for i in order],
        "nary",
        [scores[i] for i in order] if scores else [],
    )


NORMALIZERS: dict[str, Callable[[dict], Example]] = {
    "explicit": normalize_explicit,
    "conversational": normalize_conversational,
    "implicit": normalize_implicit,
    "sharegpt": normalize_sharegpt,
    "binarized": normalize_binarized,
    "nary": normalize_nary,
}


def detect_format(row: dict) -> str:
    """Pick the format from a row's fields (see NORMALIZERS); `data.format` overrides it."""
    if "conversations" in row:
        return "sharegpt"
    if "responses" in row:
        return "nary"
    if "score_chosen" in row or "score_rejected" in row:
        return "binarized"
    if "prompt" not in row and ("chosen" in row or "rejected" in row):
        return "implicit"
    if isinstance(row.get("prompt"), list):
        return "conversational"
    if isinstance(row.get("chosen"), list):
        return "binarized"
    return "explicit"


def normalize_row(row: Any, fmt: str = "auto") -> Example:
    """One decoded row -> Example, or RowProblem naming the field and reason."""
    if not isinstance(row, dict):
        raise RowProblem("<row>", "wrong_type", f"expected an object with fields, got {_kind(row)}")
    return NORMALIZERS[detect_format(row) if fmt == "auto" else fmt](row)


def row_dimensions(row: Any) -> list[str]:
    """The preference dimensions a row's pair is labelled with (Sequential PO, `data.dimension`): its
    `dimension` (a string) or `dimensions` (a list of strings: one pair judged the same way on several)."""
    if not isinstance(row, dict) or (row.get("dimension") is None and row.get("dimensions") is None):
        have = ", ".join(sorted(map(str, row))) if isinstance(row, dict) else _kind(row)
        raise RowProblem(
            "dimension",
            "bad_dimension",
            "data.dimension selects rows by their 'dimension' label (a string) or 'dimensions' (a list of "
            f"strings); this row has neither (keys: {have})",
        )
    if row.get("dimension") is not None:
        value = row["dimension"]
        if not isinstance(value, str) or not value.strip():
            raise RowProblem("dimension", "bad_dimension", f"expected a non-empty string, got {value!r:.80}")
        return [value]
    value = row["dimensions"]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise RowProblem(
            "dimensions",
            "bad_dimension",
            f"expected a non-empty list of non-empty strings, got {value!r:.80}",
        )
    return list(value)
