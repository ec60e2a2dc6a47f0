"""The parts a training worker wires together, each built from the config and the driver's `loop_config`:
models and optimizer (`StepContext`), the restored position, the online sampler, the run's logs and the
evaluator. `loop.py` holds the recipe that runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spo_ray.config import Config, draws_online_samples
from spo_ray.losses import LossParams, get_loss
from spo_ray.models.loading import (
    enable_gradient_checkpointing,
    load_causal_lm,
    load_policy_and_reference,
    load_tokenizer,
)
from spo_ray.storage import local_copy
from spo_ray.training.checkpointing import CheckpointStore, TrainState, load_checkpoint, read_state
from spo_ray.training.context import StepContext
from spo_ray.training.degree import DegreeAux
from spo_ray.training.evaluation import Evaluator
from spo_ray.training.metrics import MetricsLogger, RowTrace
from spo_ray.training.online import OnlineSampler
from spo_ray.training.optim import build_optimizer
from spo_ray.training.parallel import prepare_policy, prepare_reference
from spo_ray.training.terms import needs_reference
from spo_ray.training.worker import Worker


def build_models(cfg: Config, loop_config: dict, worker: Worker):
    """(StepContext, optimizer, scheduler): the policy (and the reference when a step reads it), wrapped for
    `train.strategy`, with the loss and its hyper-parameters."""
    spec = get_loss(cfg.loss.name)
    mixed = cfg.train.precision == "bf16"
    policy, reference, reference_mode = load_policy_and_reference(
        cfg.model,
        loop_config["model_dir"],
        loop_config["reference_dir"],
        # the online KL reads the reference, and so do reference-based losses unless precomputed
        need_reference=cfg.loss.kl_coef > 0 or needs_reference(spec, loop_config["ref_logps_precomputed"]),
        mixed_precision=mixed,
    )
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    reference = prepare_reference(reference, cfg.train.strategy, worker.device)
    policy = prepare_policy(policy, cfg.train.strategy, worker.device)
    optimizer, scheduler = build_optimizer(policy, cfg.train)
    ctx = StepContext(
        policy=policy,
        reference=reference,
        reference_mode=reference_mode,
        spec=spec,
        params=LossParams.from_config(cfg.loss),
        kl_coef=cfg.loss.kl_coef,
        kl_estimator=cfg.loss.kl_estimator,
        importance_clip=cfg.rollout.importance_clip,
        compute_dtype=torch.bfloat16 if mixed else None,
        kl_on=cfg.loss.kl_on,
        entropy_on=cfg.loss.entropy_on if cfg.loss.target_entropy > 0 else "",
        entropy_min_prob=cfg.loss.entropy_min_prob if cfg.loss.target_entropy > 0 else 0.0,
    )
    if cfg.loss.sspo_lambda > 0:  # the degree head: outside the policy, same init on every rank
        ctx.degree = DegreeAux.build(
            policy, cfg.loss.sspo_lambda, cfg.loss.sspo_levels, cfg.train.seed, cfg.train, worker.device
        )
    return ctx, optimizer, scheduler


def restore(
    store: CheckpointStore, resume_from, worker: Worker, model, optimizer, scheduler, degree=None
) -> TrainState:
    """The position and weights to start from: the checkpoint the driver's store chose and started the data
    stream from (never Ray's own record: it misses a save whose driver died before recording it), or a newer
    save of the same store when Ray restarted the worker group within this run (sizes checked; the driver
    verified the hashes). A fresh run starts at step 0."""
    newest = store.latest()
    if newest is not None and (resume_from is None or read_state(newest).step > read_state(resume_from).step):
        resume_from = newest
    if resume_from is None:
        return TrainState()
    with local_copy(resume_from) as local_dir:  # a remote checkpoint is downloaded first
        return load_checkpoint(
            local_dir, rank=worker.rank, model=model, optimizer=optimizer, scheduler=scheduler, degree=degree
        )


def build_online(
    cfg: Config, loop_config: dict, worker: Worker, model, state: TrainState
) -> OnlineSampler | None:
    """The online sampler of the global KL regularizer (None without it), serving the weights of `state`."""
    if not draws_online_samples(cfg) or loop_config.get("rollout_pool") is None:
        return None
    online = OnlineSampler(
        loop_config["rollout_pool"],
        loop_config["reg_prompts_ref"],
        cfg.rollout,
        rank=worker.rank,
        seed=cfg.train.seed,
    )
    if state.step > 0:  # resumed: the rollout must serve the restored weights
        online.sync(model, state.step, wait=True)  # every rank gathers (FSDP shards), rank 0 sends
        state.policy_version = state.step
        worker.barrier()
    return online


def build_evaluator(cfg: Config, loop_config: dict, worker: Worker, ctx: StepContext) -> Evaluator | None:
    """The held-out evaluator, when the driver sent eval rows; every rank evaluates its share."""
    if loop_config.get("eval_rows") is None:
        return None
    return Evaluator(
        loop_config["eval_rows"],
        ctx,
        batch_size=cfg.train.batch_size,
        rank=worker.rank,
        world=worker.world,
        pad_token_id=loop_config["pad_token_id"],
        packing=cfg.data.packing,
        device=worker.device,
        load_reference=lambda: prepare_reference(
            load_causal_lm(loop_config["reference_dir"], cfg.model.dtype), cfg.train.strategy, worker.device
        ),
    )


@dataclass
class RunLogs:
    """This rank's outputs of a step: metrics.jsonl, wandb and the bar (rank 0), the policy's samples
    (rank 0, logging.samples_every), and its rows (logging.row_trace)."""

    cfg: Config
    logger: MetricsLogger | None
    trace: RowTrace | None
    tokenizer: object | None  # decodes samples for samples.jsonl; None: no samples are logged

    @classmethod
    def open(cls, cfg: Config, loop_config: dict, worker: Worker, start_step: int, online: bool) -> RunLogs:
        output_dir = loop_config["output_dir"]
        logger = None
        if worker.is_chief:
            logger = MetricsLogger(
                output_dir, cfg.logging, loop_config["config"], cfg.train.max_steps, start_step
            )
        trace = RowTrace(output_dir, worker.rank, start_step) if cfg.logging.row_trace else None
        logs_samples = logger is not None and online and cfg.logging.samples_every
        tokenizer = load_tokenizer(loop_config["model_dir"]) if logs_samples else None
        return cls(cfg, logger, trace, tokenizer)

    @property
    def writers(self) -> list:
        return [w for w in (self.logger, self.trace) if w is not None]

    def log(self, step: int, metrics: dict, rows: list[int], samples: list | None) -> None:
        if self.tokenizer is not None and step % self.cfg.logging.samples_every == 0:
            self.logger.log_samples(
                step, sample_rows(self.tokenizer, samples, step, self.cfg.logging.num_samples)
            )
        if self.logger is not None:
            self.logger.log(step, metrics)
        if self.trace is not None:
            self.trace.log(step, rows)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


def sample_rows(tokenizer, samples: list, step: int, count: int) -> list[dict]:
    """The first `count` online samples of this step as samples.jsonl rows (prompt and completion decoded)."""
    return [
        {
            "step": step,
            "policy_version": sample.policy_version,
            "prompt": tokenizer.decode(list(sample.prompt_token_ids), skip_special_tokens=True),
            "completion": tokenizer.decode(list(sample.token_ids), skip_special_tokens=True),
            "finish_reason": sample.finish_reason,
        }
        for sample in samples[:count]
    ]
