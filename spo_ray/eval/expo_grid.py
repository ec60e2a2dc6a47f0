"""Evaluators of an ExPO λ grid (`spo-ray extrapolate --grid`): one per kind of judgement, each with
`evaluate(folder, weight, version) -> row` (the row's `metric` is maximized) and `close()`.

`TaskEvaluator` is exact, on a built-in task with known answers (its `exact_metrics`); `JudgeEvaluator`
samples each λ's model from one rollout pool (weights synced per λ) and scores the samples with a judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spo_ray.errors import ConfigError

# Columns of the console table per evaluation: (key in a grid row, header).
EXACT_COLUMNS = (
    ("judge_expected_reward", "E[judge]"),
    ("expected_reward", "E[r | S]"),
    ("tv_to_target", "TV to target"),
    ("entropy", "entropy"),
    ("mass_on_s", "mass on S"),
)


class TaskEvaluator:
    """Exact metrics of each λ's model on a built-in task with known answers (no sampling).

    Best by the judge's expected score E_{y~π}[judge(x, y)] = Σ_S π·r + (1 − mass on S)·OUTSIDE_SCORE:
    what the mean judge score of sampled responses estimates. `expected_reward` (π renormalized on S)
    alone would favour a λ that pushes nearly all mass off S.
    """

    metric = "judge_expected_reward"
    columns = EXACT_COLUMNS

    def __init__(self, task: Any, alpha: float):
        self.task = task
        self.alpha = alpha

    def evaluate(self, folder: Path, weight: float, version: int) -> dict:
        metrics = self.task.exact_metrics(folder, self.alpha)
        keys = (
            "judge_expected_reward",
            "expected_reward",
            "tv_to_target",
            "entropy",
            "mass_on_s",
            "target_expected_reward",
            "distribution_on_s",
        )
        return {key: metrics[key] for key in keys}

    def close(self) -> None:
        """Nothing to release."""


def judge_prompts(cfg: Any, task: Any) -> list[list[dict[str, str]]]:
    """The first `iterate.eval_prompts` prompts of the rounds' prompt set (iterate.prompts_file, or the task's,
    or data.reg_prompts_file), as chat messages: the eval prompts of `spo-ray iterate`'s rounds."""
    from spo_ray.iterative.rounds import prompt_set

    return prompt_set(cfg, task)[: cfg.iterate.eval_prompts]


class JudgeEvaluator:
    """Samples of each λ's model (one rollout pool; weights synced per λ) judged by `cfg.judge`.

    A scoring judge gives the mean score; a pairwise judge the win rate P(λ's sample ≻ λ = 0's sample),
    pairing sample i of each prompt with the aligned model's sample i. Verdicts the judge could not give
    are left out of the mean and counted in the row's `failures`.
    """

    def __init__(self, cfg: Any, task: Any, aligned_dir: str, verbose: bool = False):
        import ray

        from spo_ray.judges import JUDGES, build_judge
        from spo_ray.training.runner import ensure_ray

        self.settings = cfg.iterate
        self.prompts = judge_prompts(cfg, task)
        self.started_ray = not ray.is_initialized()
        self.pool = self.judge = None
        if self.started_ray:  # a fresh local runtime, or RAY_ADDRESS's cluster; never a stray `ray start`
            ensure_ray(cfg, log_to_driver=verbose)
        try:
            try:
                self.judge = build_judge(cfg.judge, task=task)
            except ConfigError as exc:  # a task's exact judge needs the task: say how this command gets it
                if cfg.judge.name in JUDGES:
                    raise
                exc.args = (f"{exc.args[0]} (pass --task PATH/task.json)",)
                raise
            self.metric = "mean_score" if self.judge.output == "scores" else "win_rate"
            self.columns = ((self.metric, self.metric.replace("_", " ")), ("judged", "judged"))
            from spo_ray.rollout import RolloutPool

            self.pool = RolloutPool.from_config(aligned_dir, cfg.rollout)
            self.baseline = self._sample()  # λ = 0: the aligned model the pool starts with
        except BaseException:
            self.close()
            raise

    def _sample(self) -> list[list[str]]:
        s = self.settings
        samples = self.pool.generate(
            self.prompts, n=s.eval_samples, max_tokens=s.max_tokens, temperature=s.temperature, seed=s.seed
        )
        return [[sample.text for sample in per_prompt] for per_prompt in samples]

    def evaluate(self, folder: Path, weight: float, version: int) -> dict:
        from spo_ray.judges import JudgeRequest, total_failures
        from spo_ray.models.extrapolate import read_state_dict

        if weight == 0:
            texts = self.baseline
        else:
            self.pool.sync_weights(read_state_dict(folder), version)
            texts = self._sample()
        if self.metric == "mean_score":
            requests = [JudgeRequest(prompt, responses) for prompt, responses in zip(self.prompts, texts)]
            judgements = self.judge.judge(requests)
            values = [s for j in judgements for s in (j.scores or []) if s is not None]
        else:
            requests = [
                JudgeRequest(prompt, [mine, base])
                for prompt, responses, baseline in zip(self.prompts, texts, self.baseline)
                for mine, base in zip(responses, baseline)
            ]
            judgements = self.judge.judge(requests)
            values = [p for j in judgements if (p := j.preference(0, 1)) is not None]
        return {
            self.metric: sum(values) / len(values) if values else None,
            "judged": len(values),
            "failures": total_failures(judgements),
            "samples": texts,
        }

    def close(self) -> None:
        """Stop the pool and the judge, and Ray if this evaluator started it."""
        import ray

        if self.pool is not None:
            self.pool.shutdown()
        if self.judge is not None:
            self.judge.close()
        if self.started_ray:
            ray.shutdown()
