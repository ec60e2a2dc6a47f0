"""`train_loop_per_worker`: the recipe each Ray Train worker runs (data -> forward -> loss -> step -> sync).

Its parts live in their own modules: the worker's rank and collectives (`worker.py`), models, restore,
online sampler, evaluator and logs (`components.py`), the data stream (`batches.py`), a step's loss
(`step.py`), and the checkpoint save (`saving.py`). This file only wires them and runs the steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray.train

from spo_ray.config import config_from_dict
from spo_ray.training.batches import batch_stream
from spo_ray.training.checkpointing import CheckpointStore, TrainState
from spo_ray.training.components import RunLogs, build_evaluator, build_models, build_online, restore
from spo_ray.training.context import StepContext
from spo_ray.training.entropy_dial import adapt_alpha, restore_alpha
from spo_ray.training.evaluation import eval_due
from spo_ray.training.online import OnlineSampler
from spo_ray.training.parallel import clip_grad_norm, gradient_sync
from spo_ray.training.samples import SampleBatch
from spo_ray.training.saving import checkpoint_due, save_or_stop
from spo_ray.training.step import compute_step
from spo_ray.training.worker import Worker


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """Run SPO (or any registry loss) on this worker's shard; rank 0 logs, syncs and checkpoints.
    Returns why the loop stopped before train.max_steps (rank 0's value reaches the driver), or None."""
    cfg = config_from_dict(loop_config["config"])
    worker = Worker.start(cfg.train.seed, cfg.logging.level)
    ctx, optimizer, scheduler = build_models(cfg, loop_config, worker)
    store = CheckpointStore(loop_config["checkpoint_root"], hashes=False)
    state = restore(store, loop_config["resume_from"], worker, ctx.policy, optimizer, scheduler, ctx.degree)
    restore_alpha(ctx, state, cfg.loss.target_entropy)
    online = build_online(cfg, loop_config, worker, ctx.policy, state)
    evaluator = build_evaluator(cfg, loop_config, worker, ctx)
    logs = RunLogs.open(cfg, loop_config, worker, state.step, online=online is not None)
    batches = batch_stream(  # the rows after the checkpoint's position, fixed now (the loop never feeds back)
        ray.train.get_dataset_shard(f"train_rank{worker.rank}"),
        resume_at=(state.epoch, state.consumed_in_epoch),
        batch_size=cfg.train.batch_size,
        pad_token_id=loop_config["pad_token_id"],
        packing=cfg.data.packing,
        rank=worker.rank,
        world=worker.world,
    )
    stopped = None
    ctx.policy.train()
    while state.step < cfg.train.max_steps:
        step = train_step(
            cfg, worker, ctx, (optimizer, scheduler), batches, online, state, loop_config["pad_token_id"]
        )
        if evaluator is not None and eval_due(state.step, cfg.train.max_steps, cfg.train.eval_every):
            step.metrics.update(evaluator.evaluate())  # every rank, at the same steps; not in step_seconds
        logs.log(state.step, step.metrics, step.rows, step.samples)
        if checkpoint_due(state.step, cfg.train.max_steps, cfg.train.checkpoint_every):
            model_state = (ctx.policy, optimizer, scheduler, state)
            shortfall = save_or_stop(
                worker,
                store,
                *model_state,
                step.metrics,
                logs.writers,
                cfg.train.keep_checkpoints,
                degree=ctx.degree,
            )
            if shortfall is not None:  # every rank stops at this same step, before saving
                stopped = {"disk_full": shortfall}
                break
    if online is not None:
        online.finish()  # the engines serve the final weights when training returns
    logs.close()
    return stopped


@dataclass
class StepRecord:
    metrics: dict[str, float]  # reduced over ranks
    rows: list[int]  # the example ids this rank trained on
    samples: list | None  # the online samples this rank regularized with


def train_step(
    cfg,
    worker: Worker,
    ctx: StepContext,
    optim,
    batches,
    online: OnlineSampler | None,
    state: TrainState,
    pad_token_id: int,
) -> StepRecord:
    """One optimizer step: train.grad_accum micro-batches, each with its share of the step's online samples;
    clip, step, advance `state`, and sync the rollout every rollout.sync_every steps."""
    optimizer, scheduler = optim
    start = time.perf_counter()
    samples, gen_wait, lag = online.get(state.step) if online is not None else (None, 0.0, 0)
    accum = cfg.train.grad_accum
    totals: dict[str, float] = {"tokens": 0.0}
    rows: list[int] = []
    data_wait = 0.0
    for micro in range(accum):
        t0 = time.perf_counter()
        batch, epoch, consumed = next(batches)
        data_wait += time.perf_counter() - t0
        rows += batch.example_ids.tolist()
        share = samples[micro::accum] if samples is not None else None
        sample_batch = SampleBatch.from_samples(share, pad_token_id, worker.device) if share else None
        with gradient_sync(ctx.policy, micro == accum - 1 or worker.world == 1):
            out = compute_step(ctx, batch.to(worker.device), sample_batch)
            (out.loss / accum).backward()
        for key, value in out.metrics.items():
            totals[key] = totals.get(key, 0.0) + value / accum
        totals["tokens"] += out.num_tokens
    if "kl_forward_seconds" in totals:  # a time, summed over the micro-steps rather than averaged
        totals["kl_forward_seconds"] *= accum
    if cfg.train.max_grad_norm > 0:
        totals["grad_norm"] = clip_grad_norm(ctx.policy.parameters(), cfg.train.max_grad_norm)
    if ctx.degree is not None:  # loss.sspo_lambda's head: its own optimizer, the policy's learning rate
        ctx.degree.step(optimizer.param_groups[0]["lr"], cfg.train.max_grad_norm, worker.world)
    if online is not None:
        online.settle()  # the last step's queued sync has copied the weights out before they change
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.epoch, state.consumed_in_epoch = epoch, consumed
    sync_seconds = 0.0
    if online is not None and state.step % cfg.rollout.sync_every == 0:
        sync_seconds = online.sync(ctx.policy, state.step)  # every rank gathers (FSDP shards), rank 0 sends
        state.policy_version = state.step
    elapsed = time.perf_counter() - start
    synced = online.last_sync if online is not None and sync_seconds else {}
    totals.update(
        lr=scheduler.get_last_lr()[0],
        policy_lag=float(lag),
        step_seconds=elapsed,
        data_wait_frac=data_wait / elapsed,
        gen_wait_frac=gen_wait / elapsed,
        sync_seconds=sync_seconds,
        sync_bytes=float(synced.get("bytes", 0)),
        sync_bytes_other_nodes=float(synced.get("bytes_to_other_nodes", 0)),
        sync_load_seconds=float(synced.get("load_seconds", 0)),  # queued -> served (hidden with async_sync)
        stale_resamples=float(online.stale_resamples if online else 0),
    )
    metrics = worker.reduce(totals)  # the same values on every rank: α moves in step everywhere
    adapt_alpha(
        ctx,
        state,
        metrics,
        cfg.loss.target_entropy,
        cfg.loss.alpha_lr,
        cfg.loss.entropy_min_prob,
        cfg.loss.entropy_on,
    )
    metrics.update(data_epoch=float(state.epoch), data_consumed=float(state.consumed_in_epoch))
    metrics["tokens_per_s"] = metrics.pop("tokens") * worker.world / elapsed
    metrics["pairs_per_s"] = cfg.train.batch_size * accum * worker.world / elapsed
    return StepRecord(metrics, rows, samples)
