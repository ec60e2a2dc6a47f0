"""`train_loop_per_worker`: the recipe each Ray Train worker runs (data -> forward -> loss -> step -> sync)."""

from __future__ import annotations

import random
import tempfile
import time

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch

from spo_ray.config import config_from_dict
from spo_ray.logs import configure_logging
from spo_ray.losses import LossParams, get_loss
from spo_ray.models.loading import (
    enable_gradient_checkpointing,
    load_causal_lm,
    load_policy_and_reference,
    load_tokenizer,
)
from spo_ray.storage import local_copy
from spo_ray.training.batches import batch_stream
from spo_ray.training.checkpointing import (
    CheckpointStore,
    TrainState,
    checkpoint_bytes,
    load_checkpoint,
    read_state,
    save_checkpoint,
    space_shortfall,
)
from spo_ray.training.evaluation import Evaluator, eval_due
from spo_ray.training.metrics import MetricsLogger, RowTrace
from spo_ray.training.online import OnlineSampler
from spo_ray.training.optim import build_optimizer
from spo_ray.training.parallel import clip_grad_norm, gradient_sync, prepare_policy, prepare_reference
from spo_ray.training.step import SampleBatch, StepContext, compute_step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Metrics whose worst rank matters more than the mean: reduced with MAX instead.
_MAX_ACROSS_RANKS = ("policy_lag", "sync_bytes", "sync_bytes_other_nodes")  # rank 0 alone syncs


def _reduce_across_ranks(metrics: dict[str, float], world_size: int, device) -> dict[str, float]:
    """Mean over ranks (MAX for `_MAX_ACROSS_RANKS`), as float32 on the worker's device so NCCL reduces it."""
    if world_size == 1:
        return metrics
    out = {}
    for op, keys in (
        (torch.distributed.ReduceOp.SUM, sorted(k for k in metrics if k not in _MAX_ACROSS_RANKS)),
        (torch.distributed.ReduceOp.MAX, sorted(k for k in metrics if k in _MAX_ACROSS_RANKS)),
    ):
        if not keys:
            continue
        packed = torch.tensor([metrics[k] for k in keys], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(packed, op=op)
        scale = world_size if op == torch.distributed.ReduceOp.SUM else 1
        out.update(zip(keys, (packed / scale).tolist()))
    return out


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """Run SPO (or any registry loss) on this worker's shard; rank 0 logs, syncs and checkpoints."""
    cfg = config_from_dict(loop_config["config"])
    configure_logging(cfg.logging.level)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one progress bar: the training one
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.train.seed * 1000 + rank)
    device = ray.train.torch.get_device()

    spec = get_loss(cfg.loss.name)
    # the reference is read by the online KL, and by reference-based losses unless precomputed
    needs_reference = cfg.loss.kl_coef > 0 or (
        spec.needs_reference and not loop_config["ref_logps_precomputed"]
    )
    mixed = cfg.train.precision == "bf16"
    policy, reference, reference_mode = load_policy_and_reference(
        cfg.model,
        loop_config["model_dir"],
        loop_config["reference_dir"],
        need_reference=needs_reference,
        mixed_precision=mixed,
    )
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    reference = prepare_reference(reference, cfg.train.strategy, device)
    policy = prepare_policy(policy, cfg.train.strategy, device)
    optimizer, scheduler = build_optimizer(policy, cfg.train)
    state = TrainState()
    # the checkpoint the driver's CheckpointStore chose and started the data stream from, never Ray's own
    # record (it misses a save whose driver died before recording it); a restart of the worker group within
    # this run resumes from a newer save of the same store (sizes checked; the driver verified the hashes)
    store = CheckpointStore(loop_config["checkpoint_root"], hashes=False)
    resume_dir = loop_config["resume_from"]
    newest = store.latest()
    if newest is not None and (resume_dir is None or read_state(newest).step > read_state(resume_dir).step):
        resume_dir = newest
    if resume_dir is not None:
        with local_copy(resume_dir) as local_dir:  # a remote checkpoint is downloaded first
            state = load_checkpoint(
                local_dir, rank=rank, model=policy, optimizer=optimizer, scheduler=scheduler
            )

    step_ctx = StepContext(
        policy=policy,
        reference=reference,
        reference_mode=reference_mode,
        spec=spec,
        params=LossParams.from_config(cfg.loss),
        kl_coef=cfg.loss.kl_coef,
        kl_estimator=cfg.loss.kl_estimator,
        importance_clip=cfg.rollout.importance_clip,
        compute_dtype=torch.bfloat16 if mixed else None,
    )
    online = None
    if cfg.loss.kl_coef > 0 and loop_config.get("rollout_pool") is not None:
        online = OnlineSampler(
            loop_config["rollout_pool"],
            loop_config["reg_prompts_ref"],
            cfg.rollout,
            rank=rank,
            seed=cfg.train.seed,
        )
    if online is not None and state.step > 0:  # resumed: the rollout must serve the restored weights
        online.sync(policy, state.step)  # every rank gathers (FSDP shards), rank 0 sends
        state.policy_version = state.step
        if world > 1:
            torch.distributed.barrier()
    logger = (
        MetricsLogger(
            loop_config["output_dir"], cfg.logging, loop_config["config"], cfg.train.max_steps, state.step
        )
        if rank == 0
        else None
    )

    trace = RowTrace(loop_config["output_dir"], rank, state.step) if cfg.logging.row_trace else None
    evaluator = None
    if loop_config.get("eval_rows") is not None:  # every rank evaluates its share (collectives inside)
        evaluator = Evaluator(
            loop_config["eval_rows"],
            step_ctx,
            batch_size=cfg.train.batch_size,
            rank=rank,
            world=world,
            pad_token_id=loop_config["pad_token_id"],
            packing=cfg.data.packing,
            device=device,
            load_reference=lambda: prepare_reference(
                load_causal_lm(loop_config["reference_dir"], cfg.model.dtype), cfg.train.strategy, device
            ),
        )
    tokenizer = (
        load_tokenizer(loop_config["model_dir"])
        if logger is not None and online is not None and cfg.logging.samples_every
        else None
    )
    batches = batch_stream(  # the rows after the checkpoint's position, fixed now (the loop never feeds back)
        ray.train.get_dataset_shard(f"train_rank{rank}"),
        resume_at=(state.epoch, state.consumed_in_epoch),
        batch_size=cfg.train.batch_size,
        pad_token_id=loop_config["pad_token_id"],
        packing=cfg.data.packing,
        rank=rank,
        world=world,
    )
    pairs_per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    stopped = None  # why the loop stopped before train.max_steps; rank 0's value reaches the driver
    policy.train()
    while state.step < cfg.train.max_steps:
        step_start = time.perf_counter()
        data_wait = gen_wait = sync_time = 0.0
        totals: dict[str, float] = {}
        step_rows: list[int] = []
        samples, lag = None, 0
        if online is not None:
            samples, gen_wait, lag = online.get(state.step)
        for micro in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch, epoch, consumed = next(batches)
            data_wait += time.perf_counter() - t0
            step_rows += batch.example_ids.tolist()
            sample_batch = None
            if samples is not None:
                share = samples[micro :: cfg.train.grad_accum]
                sample_batch = (
                    SampleBatch.from_samples(share, loop_config["pad_token_id"], device) if share else None
                )
            batch = batch.to(device)
            sync_grads = micro == cfg.train.grad_accum - 1 or world == 1
            with gradient_sync(policy, sync_grads):
                out = compute_step(step_ctx, batch, sample_batch)
                (out.loss / cfg.train.grad_accum).backward()
            for key, value in out.metrics.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.train.grad_accum
            totals["tokens"] = totals.get("tokens", 0.0) + out.num_tokens
        if cfg.train.max_grad_norm > 0:
            totals["grad_norm"] = clip_grad_norm(policy.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.epoch, state.consumed_in_epoch = epoch, consumed
        if online is not None and state.step % cfg.rollout.sync_every == 0:
            sync_time = online.sync(policy, state.step)  # every rank gathers (FSDP shards), rank 0 sends
            state.policy_version = state.step
        elapsed = time.perf_counter() - step_start
        totals.update(
            lr=scheduler.get_last_lr()[0],
            policy_lag=float(lag),
            step_seconds=elapsed,
            data_wait_frac=data_wait / elapsed,
            gen_wait_frac=gen_wait / elapsed,
            sync_seconds=sync_time,
            sync_bytes=float(online.last_sync.get("bytes", 0) if sync_time else 0),
            sync_bytes_other_nodes=float(online.last_sync.get("bytes_to_other_nodes", 0) if sync_time else 0),
            stale_resamples=float(online.stale_resamples if online else 0),
        )
        metrics = _reduce_across_ranks(totals, world, device)
        metrics.update(data_epoch=float(state.epoch), data_consumed=float(state.consumed_in_epoch))
        metrics["tokens_per_s"] = metrics.pop("tokens") * world / elapsed
        metrics["pairs_per_s"] = pairs_per_step / elapsed
        if evaluator is not None and eval_due(state.step, cfg.train.max_steps, cfg.train.eval_every):
            metrics.update(evaluator.evaluate())  # every rank, at the same steps; not in step_seconds
        if tokenizer is not None and state.step % cfg.logging.samples_every == 0:
            logger.log_samples(
                state.step, sample_rows(tokenizer, samples, state.step, cfg.logging.num_samples)
            )
        if logger is not None:
            logger.log(state.step, metrics)
        if trace is not None:
            trace.log(state.step, step_rows)
        last = state.step == cfg.train.max_steps
        if last or (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0):
            shortfall = _disk_shortfall(rank, store, policy, optimizer, logger, trace)
            if _on_any_rank(shortfall is not None, world, device):  # every rank stops at this same step
                stopped = {"disk_full": shortfall or "another rank could not write its files"}
                break
            for writer in (logger, trace):  # a remote output dir gets the lines up to this checkpoint
                if writer is not None:
                    writer.sync()
            _report_checkpoint(rank, policy, optimizer, scheduler, state, metrics)
            if rank == 0:  # the folder just reported is the newest; older and torn ones go
                store.prune(cfg.train.keep_checkpoints)
    if logger is not None:
        logger.close()
    return stopped


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


def _disk_shortfall(rank, store, policy, optimizer, logger, trace) -> str | None:
    """What says the disk is full before this checkpoint: a failed metrics/trace write, or too little room."""
    writers = [w for w in (logger, trace) if w is not None]
    failed = next((w.write_error for w in writers if w.write_error), None)
    if failed or rank != 0:
        return failed
    return space_shortfall(store.root, checkpoint_bytes(policy, optimizer))


def _on_any_rank(flag: bool, world_size: int, device) -> bool:
    if world_size == 1:
        return flag
    packed = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
    return bool(packed.item())


def _report_checkpoint(rank, policy, optimizer, scheduler, state, metrics) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, rank=rank, model=policy, optimizer=optimizer, scheduler=scheduler, state=state)
        ray.train.report({"step": state.step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
