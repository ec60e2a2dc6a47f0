"""Judge-based comparisons of two policies' samples: win rate, mean score, Monte-Carlo entropy."""

from __future__ import annotations

from spo_ray.judges.base import Judge, Judgement, JudgeRequest, total_failures


def head_to_head(
    judge: Judge, prompts: list[list[dict[str, str]]], ours: list[list[str]], theirs: list[list[str]]
) -> dict:
    """Win rate of `ours` over `theirs` on the same prompts: the mean judge P(a ≻ b) over every
    (a from ours, b from theirs) of a prompt; missing verdicts are left out and counted."""
    judgements = judge.judge([JudgeRequest(p, a + b) for p, a, b in zip(prompts, ours, theirs)])
    wins, missing = [], 0
    for judgement, a in zip(judgements, ours):
        for i in range(len(a)):
            for j in range(len(a), judgement.num_responses):
                p = judgement.preference(i, j)
                if p is None:
                    missing += 1
                else:
                    wins.append(p)
    return {
        "win_rate": sum(wins) / len(wins) if wins else None,
        "comparisons": len(wins),
        "missing": missing,
        "failures": total_failures(judgements),
    }


def mean_score(judgements: list[Judgement]) -> float | None:
    """Mean judge score over every scored response (scoring judges); None for pairwise judges."""
    scores = [s for j in judgements if j.scores is not None for s in j.scores if s is not None]
    return sum(scores) / len(scores) if scores else None


def monte_carlo_entropy(sequence_logps: list[float]) -> float | None:
    """H(π) ≈ −mean log π(y) over samples y ~ π (nats per response)."""
    return -sum(sequence_logps) / len(sequence_logps) if sequence_logps else None
