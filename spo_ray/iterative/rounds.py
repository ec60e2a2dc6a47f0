"""`spo-ray iterate`: rounds of generate -> judge -> build examples -> train k steps -> sync -> evaluate.

Layout of the output dir:

    DIR/rounds/round_T/candidates.jsonl   samples of π_{T-1} for the round's prompts (rollout pool)
    DIR/rounds/round_T/examples.jsonl     rows built from the judge's verdicts (+ judging.json: counts)
    DIR/rounds/round_T/train/             the round's Ray Train run (checkpoints, metrics, final/)
    DIR/rounds/round_T/eval_samples.jsonl samples of π_T on the fixed eval prompts
    DIR/rounds/round_T/round.json         the round's metrics; round_0 describes the starting policy
    DIR/summary.json                      {"rounds": [round 0, round 1, ...], ...}

Every stage writes its file atomically and is skipped when the file exists, and the training stage
resumes from its own checkpoints, so re-running the command continues a run killed mid-round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from spo_ray.config import Config, TaskConfig, config_to_dict, draws_online_samples
from spo_ray.errors import ConfigError
from spo_ray.eval.win_rate import head_to_head, mean_score, monte_carlo_entropy
from spo_ray.iterative.examples import LOSS_KIND_OF_EXAMPLES, JudgedPrompt, build_examples
from spo_ray.judges.base import JudgeRequest, build_judge, total_failures
from spo_ray.storage import local_output
from spo_ray.tasks import prepare_task


def run_iterate(cfg: Config, callbacks: Sequence = ()) -> dict:
    """Run (or resume) `iterate.rounds` rounds; write DIR/summary.json with the list `rounds`.

    `callbacks`: `spo_ray.Callback`s given to each round's training run (their `round` set to the round)."""
    from spo_ray.models.loading import resolve_model_dir
    from spo_ray.rollout import RolloutPool
    from spo_ray.training.metrics import MetricsLogger
    from spo_ray.training.runner import ensure_ray

    started = time.perf_counter()
    kind = _example_kind(cfg)
    out = local_output(cfg.output.dir, "spo-ray iterate")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    ensure_ray(cfg, extra_cpus=_extra_cpus(cfg))
    cfg, task = prepare_task(cfg, out)  # a built-in task writes its data and reference; else (cfg, None)
    start_dir = resolve_model_dir(cfg.model, out)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, reference_path=cfg.model.reference_path or start_dir)
    )
    prompts = prompt_set(cfg, task)
    records = _completed_rounds(out)
    current = records[-1]["model"] if records else start_dir
    with contextlib.ExitStack() as stack:  # closes whatever was started, in reverse, on any error
        judge = build_judge(cfg.judge, task=task)
        stack.callback(judge.close)
        pool = RolloutPool.from_config(current, cfg.rollout, lora_rank=cfg.model.lora.r)
        stack.callback(pool.shutdown)
        logger = MetricsLogger(
            str(out), cfg.logging, config_to_dict(cfg), cfg.iterate.rounds, max(0, len(records) - 1), "rounds"
        )
        stack.callback(logger.close)
        context = _Round(cfg, task, prompts, pool, judge, callbacks)
        if not records:  # round 0: the starting policy
            records.append(context.evaluate(0, current, previous=None, reference=None))
            _write_json(out / "rounds" / "round_0" / "round.json", records[0])
            logger.log(0, _loggable(records[0]))
        for number in range(len(records), cfg.iterate.rounds + 1):
            record = context.run(number, current, kind, records[-1], records[0])
            current = record["model"]
            records.append(record)
            logger.log(number, _loggable(record))
    summary = {
        "rounds": records,
        "final_model": current,
        "examples": kind,
        "loss": cfg.loss.name,
        "judge": cfg.judge.name,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    _write_json(out / "summary.json", summary)
    return summary


class _Round:
    """What every round needs: config (model.reference_path = the starting policy), task, prompt set,
    rollout pool, judge and the user's training callbacks."""

    def __init__(self, cfg: Config, task, prompts, pool, judge, callbacks: Sequence = ()):
        from spo_ray.data import Templater

        self.cfg, self.task, self.prompts, self.pool, self.judge = cfg, task, prompts, pool, judge
        self.callbacks = list(callbacks)
        tokenizer_dir = cfg.model.reference_path
        self.templater = Templater.from_path(tokenizer_dir, cfg.data.max_length, cfg.data.max_prompt_length)
        self.rounds_dir = local_output(cfg.output.dir, "spo-ray iterate") / "rounds"
        self.eval_prompts = eval_prompt_set(cfg, task, prompts)[: cfg.iterate.eval_prompts]

    def run(self, number: int, current: str, kind: str, previous: dict, reference: dict) -> dict:
        """Round `number`: candidates of π_{number-1} = `current` (which the pool serves), judge, build
        examples, train, sync, evaluate."""
        started = time.perf_counter()
        folder = self.rounds_dir / f"round_{number}"
        it = self.cfg.iterate
        rng = random.Random(f"{it.seed}:round:{number}")
        chosen = rng.sample(range(len(self.prompts)), min(it.prompts_per_round, len(self.prompts)))
        candidates = _stage(
            folder / "candidates.jsonl",
            lambda: self._sample([self.prompts[i] for i in chosen], it.candidates_per_prompt, number),
        )
        examples_path = folder / "examples.jsonl"
        judging = _stage_json(
            folder / "judging.json", lambda: self._judge(candidates, kind, rng, examples_path)
        )
        train = self._train(number, current, examples_path, judging)
        self._serve(train["final_model"])
        record = self.evaluate(number, train["final_model"], previous=previous, reference=reference)
        record.update(
            examples=judging["examples"],
            skipped=judging["skipped"],
            truncated_candidates=judging["truncated_candidates"],
            judge_failures=judging["failures"],
            train_steps=train["steps"],
            train_lr=self.round_lr(number),
            train_final_loss=train["final_metrics"].get("pref_loss"),
            round_seconds=round(time.perf_counter() - started, 2),
        )
        _write_json(folder / "round.json", record)
        return record

    def round_lr(self, number: int) -> float:
        """train.lr annealed by iterate.lr_decay per round after the first."""
        return self.cfg.train.lr * self.cfg.iterate.lr_decay ** (number - 1)

    # -- stages -------------------------------------------------------------------------------------
    def _serve(self, model_dir: str) -> None:
        """Make the rollout pool serve `model_dir` as version 0 (the next round's training starts there)."""
        from spo_ray.models.loading import load_causal_lm
        from spo_ray.rollout.weights import state_dict_for_sync

        self.pool.sync_weights(state_dict_for_sync(load_causal_lm(model_dir)), 0)

    def _sample(self, prompts: list, n: int, number: int) -> list[dict]:
        """n samples per prompt from the served policy: text and sequence log-prob."""
        it = self.cfg.iterate
        groups = self.pool.generate(
            self.templater.encode_prompts(prompts),
            n=n,
            max_tokens=it.max_tokens,
            temperature=it.temperature,
            top_p=1.0,
            seed=it.seed * 100_003 + number,
        )
        return [
            {
                "prompt": prompt,
                "responses": [s.text for s in group],
                "logps": [sum(s.logprobs) for s in group],
                "finish_reasons": [s.finish_reason for s in group],
            }
            for prompt, group in zip(prompts, groups)
        ]

    def _judge(self, candidates: list[dict], kind: str, rng: random.Random, path: Path) -> dict:
        """Judge the candidates, build the round's rows into `path`; return the counts."""
        judgements = self.judge.judge([JudgeRequest(c["prompt"], c["responses"]) for c in candidates])
        judged = [JudgedPrompt(c["prompt"], c["responses"], j) for c, j in zip(candidates, judgements)]
        rows, skipped = build_examples(judged, kind, self.cfg.iterate.labels, rng)
        if not rows:
            raise RuntimeError(
                f"round {path.parent.name}: no training examples could be built from the judged candidates "
                f"(skipped: {dict(skipped)}, judge failures: {total_failures(judgements)}); raise "
                "iterate.candidates_per_prompt or iterate.temperature, or check the judge"
            )
        _write_jsonl(path, rows)
        return {
            "examples": len(rows),
            # samples cut at iterate.max_tokens: trained on as if they had ended there (with eos)
            "truncated_candidates": sum(c["finish_reasons"].count("length") for c in candidates),
            "skipped": dict(skipped),
            "failures": total_failures(judgements),
            "mean_score": mean_score(judgements),
        }

    def start_alpha(self, number: int) -> float:
        """SPO's α for round `number`'s first step: loss.alpha, or with loss.target_entropy the α the dial
        had reached after the previous round's last step (its next step's α), so α is not reset each round."""
        loss = self.cfg.loss
        previous = self.rounds_dir / f"round_{number - 1}" / "train" / "summary.json"
        if loss.target_entropy <= 0 or number == 1 or not previous.exists():
            return loss.alpha
        from spo_ray.training.entropy_dial import dual_ascent_alpha

        last = json.loads(previous.read_text())["final_metrics"]
        if "entropy/measured" not in last:  # its last step measured nothing: α held
            return last.get("alpha", loss.alpha)
        return dual_ascent_alpha(last["alpha"], loss.target_entropy, last["entropy/measured"], loss.alpha_lr)

    def _train(self, number: int, current: str, examples_path: Path, judging: dict) -> dict:
        """k optimizer steps from `current` on the round's rows (and `replay_rounds` earlier rounds' rows);
        resumes from its checkpoints, and is skipped once its final/ exists."""
        from spo_ray.training.runner import run_training

        folder = self.rounds_dir / f"round_{number}"
        train_dir = folder / "train"
        if (train_dir / "summary.json").exists() and (train_dir / "final" / "config.json").exists():
            return json.loads((train_dir / "summary.json").read_text())
        cfg = self.cfg
        replayed = [
            self.rounds_dir / f"round_{earlier}" / "examples.jsonl"
            for earlier in range(max(1, number - cfg.iterate.replay_rounds), number)
        ]
        batch = cfg.train.batch_size * cfg.train.num_workers
        if judging["examples"] < batch:
            raise ConfigError(
                "train.batch_size",
                f"round {folder.name} built {judging['examples']} examples, fewer than one batch of {batch}; "
                "lower train.batch_size or raise iterate.prompts_per_round / iterate.candidates_per_prompt",
            )
        round_cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, path=current),
            loss=dataclasses.replace(cfg.loss, alpha=self.start_alpha(number)),
            data=dataclasses.replace(
                cfg.data,
                train_files=[str(path) for path in [*replayed, examples_path]],
                eval_files=[],
                eval_fraction=0.0,
                format="auto",
            ),
            train=dataclasses.replace(
                cfg.train,
                max_steps=cfg.iterate.steps_per_round,
                lr=self.round_lr(number),
            ),
            task=TaskConfig(),
            output=dataclasses.replace(cfg.output, dir=str(train_dir)),
        )
        for callback in self.callbacks:
            callback.round = number  # the round whose steps (counted from 1) the callback is about to see
        pool = self.pool if draws_online_samples(cfg) else None
        return run_training(round_cfg, rollout_pool=pool, callbacks=self.callbacks)

    # -- metrics ------------------------------------------------------------------------------------
    def evaluate(self, number: int, model_dir: str, previous: dict | None, reference: dict | None) -> dict:
        """Samples of π_number on the eval prompts; judge win rates against the previous round's and the
        starting policy's samples, mean judge score, entropy; exact metrics on the synthetic task."""
        folder = self.rounds_dir / f"round_{number}"
        samples = _stage(
            folder / "eval_samples.jsonl",
            lambda: self._sample(self.eval_prompts, self.cfg.iterate.eval_samples, 10_000 + number),
        )
        ours = [s["responses"] for s in samples]
        record: dict = {"round": number, "model": model_dir}
        failures: Counter[str] = Counter()
        for name, other in (("previous", previous), ("reference", reference)):
            if other is None:
                continue
            theirs = [s["responses"] for s in _read_jsonl(Path(other["eval_samples"]))]
            result = head_to_head(self.judge, self.eval_prompts, ours, theirs)
            record[f"win_rate_vs_{name}"] = result["win_rate"]
            failures.update(result["failures"])
        record["expected_reward"] = None  # a mean judge score: scoring judges only
        if self.judge.output == "scores":
            scored = self.judge.judge([JudgeRequest(p, r) for p, r in zip(self.eval_prompts, ours)])
            record["expected_reward"] = mean_score(scored)
            failures.update(total_failures(scored))
        # −mean log π(y) over samples: the policy's entropy when iterate.temperature is 1 (the default)
        record["entropy"] = monte_carlo_entropy([lp for s in samples for lp in s["logps"]])
        record["eval_judge_failures"] = dict(failures)
        record["eval_samples"] = str(folder / "eval_samples.jsonl")
        if self.task is not None and hasattr(self.task, "exact_metrics"):
            record.update(self._exact(model_dir))
        return record

    def _exact(self, model_dir: str) -> dict:
        """The built-in task's exact metrics of π: expected reward, TV to softmax(r/α), entropy, mass on S."""
        metrics = self.task.exact_metrics(model_dir, self.cfg.loss.alpha)
        keys = ("judge_expected_reward", "expected_reward", "tv_to_target", "entropy", "mass_on_s")
        return {f"expert_{k}": metrics[k] for k in keys}


# ---------------------------------------------------------------------------------------------------
# helpers


def _example_kind(cfg: Config) -> str:
    """The rows a round builds: SPPO's own rows for loss sppo, else iterate.examples, checked against the loss."""
    from spo_ray.losses import get_loss

    loss_kind = get_loss(cfg.loss.name).kind
    if loss_kind == "sppo":
        if cfg.iterate.replay_rounds:
            raise ConfigError(
                "iterate.replay_rounds",
                "sppo rows hold win probabilities against the round's own policy π_t; set it to 0 for sppo",
            )
        return "sppo"
    wanted = cfg.iterate.examples
    if LOSS_KIND_OF_EXAMPLES[wanted] != loss_kind:
        fitting = [k for k, v in LOSS_KIND_OF_EXAMPLES.items() if v == loss_kind]
        raise ConfigError(
            "iterate.examples",
            f"'{wanted}' rows do not fit loss '{cfg.loss.name}' (it trains on {loss_kind} examples); "
            f"set iterate.examples={fitting[0]} or pick a {LOSS_KIND_OF_EXAMPLES[wanted]} loss",
        )
    return wanted


def _extra_cpus(cfg: Config) -> float:
    """CPUs beyond the training run's own: the candidate pool when training runs offline, judge actors."""
    rollout = 0.0 if draws_online_samples(cfg) else cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor
    exact = cfg.judge.name in ("task", cfg.task.name)  # a built-in task's judge runs in the driver
    judge = 0.0 if exact else cfg.judge.num_actors * cfg.judge.num_cpus_per_actor
    return rollout + judge


def prompt_set(cfg: Config, task) -> list[list[dict[str, str]]]:
    """The rounds' prompts: iterate.prompts_file, else the task's prompts, else data.reg_prompts_file."""
    from spo_ray.data import read_prompts

    if cfg.iterate.prompts_file:
        return read_prompts(cfg.iterate.prompts_file, "iterate.prompts_file", dedupe=True)
    if task is not None:
        return task.prompt_messages()
    if cfg.data.reg_prompts_file:  # the regularizer's prompts, read as load_reg_prompts reads them
        skip = cfg.data.on_bad_rows == "skip"
        return read_prompts(cfg.data.reg_prompts_file, "data.reg_prompts_file", dedupe=True, skip_bad=skip)
    raise ConfigError(
        "iterate.prompts_file",
        "the rounds need prompts: give a text file (one prompt per line) or JSONL with a 'prompt' per line",
    )


def eval_prompt_set(cfg: Config, task, prompts: list) -> list[list[dict[str, str]]]:
    """The per-round evaluation's prompts: iterate.eval_prompts_file, else the task's held-out prompts, else
    the rounds' own prompt set."""
    from spo_ray.data import read_prompts

    if cfg.iterate.eval_prompts_file:
        return read_prompts(cfg.iterate.eval_prompts_file, "iterate.eval_prompts_file", dedupe=True)
    if task is not None and hasattr(task, "eval_prompt_messages"):
        return task.eval_prompt_messages()
    return prompts


def _completed_rounds(out: Path) -> list[dict]:
    """round.json of rounds 0, 1, ... up to the first one not finished."""
    records = []
    while (path := out / "rounds" / f"round_{len(records)}" / "round.json").exists():
        records.append(json.loads(path.read_text()))
    return records


def _loggable(record: dict) -> dict:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _stage(path: Path, produce: Callable[[], list[dict]]) -> list[dict]:
    """The rows in `path`, produced and written atomically first if the file does not exist yet."""
    if not path.exists():
        _write_jsonl(path, produce())
    return _read_jsonl(path)


def _stage_json(path: Path, produce: Callable[[], dict]) -> dict:
    if not path.exists():
        _write_json(path, produce())
    return json.loads(path.read_text())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_json(path: Path, value: dict) -> None:
    _atomic_write(path, json.dumps(value, indent=1))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
