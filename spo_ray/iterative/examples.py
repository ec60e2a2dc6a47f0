"""One round's training rows from judged candidates: pairs, best-of-n, ranked, or SPPO's self-play rows.

Labels are either drawn from the judge's probabilities ('sampled': a pair's winner with P(i ≻ j), a
best-of-n winner ∝ exp(u), a Plackett–Luce ranking by Gumbel-perturbed utilities u), which keeps SPO's
fixed point at softmax(r/α) for a Bradley–Terry judge, or taken as the judge's preferred order
('argmax'). Whatever cannot become a row (identical texts, empty responses, missing verdicts, ties
under argmax) is counted by reason, never guessed.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass

from spo_ray.judges.base import Judgement

EXAMPLE_KINDS = ("pairs", "best_of_n", "ranked", "sppo")
LOSS_KIND_OF_EXAMPLES = {"pairs": "pairwise", "best_of_n": "best_of_n", "ranked": "ranked", "sppo": "sppo"}


@dataclass
class JudgedPrompt:
    """A prompt (chat messages), the candidates sampled for it, and the judge's verdict on them."""

    prompt: list[dict[str, str]]
    responses: list[str]
    judgement: Judgement


def build_examples(
    judged: list[JudgedPrompt], kind: str, labels: str, rng: random.Random
) -> tuple[list[dict], Counter]:
    """(rows in a format the data pipeline reads, skipped counts by reason) for one round."""
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"unknown example kind {kind!r}; known: {', '.join(EXAMPLE_KINDS)}")
    if labels not in ("sampled", "argmax"):
        raise ValueError(f"labels must be 'sampled' or 'argmax', got {labels!r}")
    skipped: Counter = Counter()
    if kind == "pairs":
        rows = [row for item in judged for row in _pairs(item, labels, rng, skipped)]
    elif kind == "sppo":
        rows = [row for item in judged if (row := _sppo_row(item, skipped)) is not None]
    else:
        rows = _groups(judged, ranked=kind == "ranked", labels=labels, rng=rng, skipped=skipped)
    return rows, skipped


def _pairs(item: JudgedPrompt, labels: str, rng: random.Random, skipped: Counter):
    """Every pair of samples (i < j): repeats of one text are skipped, others labelled by the judge."""
    for i, j in itertools.combinations(range(len(item.responses)), 2):
        a, b = item.responses[i], item.responses[j]
        if not a.strip() or not b.strip():
            skipped["empty_response"] += 1
            continue
        if a.strip() == b.strip():
            skipped["identical_pair"] += 1
            continue
        p = item.judgement.preference(i, j)
        if p is None:
            skipped["no_verdict"] += 1
            continue
        if labels == "sampled":
            first_wins = rng.random() < p
        elif p == 0.5:
            skipped["tie"] += 1
            continue
        else:
            first_wins = p > 0.5
        chosen, rejected = (a, b) if first_wins else (b, a)
        yield {"prompt": item.prompt, "chosen": chosen, "rejected": rejected}


def _distinct_scored(item: JudgedPrompt, skipped: Counter) -> list[tuple[str, float]] | None:
    """(text, utility) of the distinct non-empty responses, or None when the judge gave no utilities."""
    utilities = item.judgement.utilities()
    if utilities is None:
        skipped["no_verdict"] += 1
        return None
    seen: dict[str, float] = {}
    for text, utility in zip(item.responses, utilities):
        if text.strip() and text.strip() not in seen:
            seen[text.strip()] = utility
        elif not text.strip():
            skipped["empty_response"] += 1
    return list(seen.items())


def _groups(
    judged: list[JudgedPrompt], *, ranked: bool, labels: str, rng: random.Random, skipped: Counter
) -> list[dict]:
    """Best-of-n or ranked rows of g distinct responses, g = the fewest distinct texts over the round's
    prompts (the pipeline needs one n per dataset); prompts with more keep a uniform random g of them."""
    scored = [(item, s) for item in judged if (s := _distinct_scored(item, skipped)) is not None]
    usable = [(item, s) for item, s in scored if len(s) >= 2]
    skipped["fewer_than_2_distinct"] += len(scored) - len(usable)
    if not usable:
        return []
    group = min(len(s) for _, s in usable)
    rows = []
    for item, s in usable:
        chosen = rng.sample(s, group) if len(s) > group else s
        utilities = [u for _, u in chosen]
        if labels == "sampled":  # Gumbel-max: the order of u + Gumbel noise is a Plackett–Luce draw
            keys = [u - math.log(-math.log(rng.random() or 1e-300)) for u in utilities]
        else:
            keys = utilities
        order = sorted(range(group), key=lambda k: -keys[k])
        rows.append(
            {
                "prompt": item.prompt,
                "responses": [text for text, _ in chosen],
                "ranking": order if ranked else order[:1],
            }
        )
    return rows


def _sppo_row(item: JudgedPrompt, skipped: Counter) -> dict | None:
    """All K samples of π_t (repeats kept: they are draws) with P̂(y_i ≻ π_t) = mean_j≠i P(i ≻ j)."""
    win_probs = item.judgement.win_probabilities()
    if any(not text.strip() for text in item.responses):
        skipped["empty_response_row"] += 1
        return None
    if any(p is None for p in win_probs):
        skipped["no_verdict_row"] += 1
        return None
    return {"prompt": item.prompt, "responses": list(item.responses), "win_probs": win_probs}
