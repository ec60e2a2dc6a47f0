"""Driver side of a training run: resolve the model, stream the data, start the rollout pool, run TorchTrainer.

`run_training(cfg)` is what `spo-ray train` and `jobs/train_spo.py` call. Re-running it on the same output
dir resumes from the latest complete checkpoint (`CheckpointStore`): the data stream starts at its position
and every worker restores its weights from it.

`output.dir` may be a filesystem URI (`spo_ray.storage`): checkpoints, metrics.jsonl, config.json,
summary.json and final/ then live there, and the driver's scratch (tokenized data, a built model) lives in
the local `storage.work_dir`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from spo_ray import storage
from spo_ray.config import Config, config_to_dict, draws_online_samples
from spo_ray.data import PromptSet, load_reg_prompts, prepare_preference_data, shard_data_config, train_shards
from spo_ray.errors import ConfigError, DiskFullError, is_disk_full
from spo_ray.logs import configure_logging, ray_logging_config
from spo_ray.losses import get_loss
from spo_ray.models.loading import load_tokenizer, resolve_model_dir
from spo_ray.training.callbacks import Callback, RunWatcher
from spo_ray.training.checkpointing import CheckpointStore, TrainState, read_state
from spo_ray.training.export import export_final_model
from spo_ray.training.loop import train_loop_per_worker
from spo_ray.training.metrics import EVAL_PREFIX, read_metrics
from spo_ray.training.reference import add_reference_logps
from spo_ray.training.resources import FirstStepWatch, check_cluster_resources
from spo_ray.training.terms import needs_reference, precomputable, scored_at_start, scored_with_base

RUN_NAME = "ray_train"


# logical CPUs left for Ray Data's read/tokenize tasks and the shards' row reads in a local runtime
DATA_CPUS = 2


def local_cpus_needed(cfg: Config) -> int:
    """Logical CPUs a local runtime needs so trainers, rollout actors and Ray Data never starve each other."""
    rollout = cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor if draws_online_samples(cfg) else 0
    return math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker + rollout) + DATA_CPUS


def ensure_ray(cfg: Config, extra_cpus: float = 0.0, log_to_driver: bool = True) -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local runtime sized for this run
    (plus `extra_cpus` for actors beyond the training run's, e.g. judges).

    On a laptop the logical CPU count is raised to what the run reserves (trainers + rollout actors +
    Ray Data), oversubscribing the cores rather than deadlocking on 2 of them; clusters keep their own.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False, log_to_driver=log_to_driver)
    else:
        # address="local": always a fresh runtime; plain ray.init() would attach to any `ray start` on the machine
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, math.ceil(local_cpus_needed(cfg) + extra_cpus)),
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=log_to_driver,
        )


def epochs_needed(cfg: Config, num_examples: int, start: int, done_steps: int) -> int:
    """Epochs the stream must cover (from position `start`) for the remaining optimizer steps."""
    world = cfg.train.num_workers
    per_epoch = num_examples - num_examples % world  # the remainder < world is dropped each epoch
    if per_epoch < cfg.train.batch_size * world:
        raise ConfigError(
            "train.batch_size",
            f"{num_examples} training examples cannot fill one batch of {cfg.train.batch_size} on each of {world} workers",
        )
    remaining = (cfg.train.max_steps - done_steps) * cfg.train.batch_size * cfg.train.grad_accum * world
    beyond_first = max(0, remaining - (per_epoch - start))
    return 1 + math.ceil(beyond_first / per_epoch) + 1  # +1: batches straddle epoch ends


def scoring_actors(cfg: Config) -> dict:
    """How the one-off log-prob scoring runs: train.reference_actors actors (0: one per training worker),
    each with a training worker's CPUs and, with train.use_gpu, a GPU."""
    t = cfg.train
    return {
        "actors": t.reference_actors or t.num_workers,
        "cpus_per_actor": t.cpus_per_worker,
        "use_gpu": t.use_gpu,
    }


def run_training(
    cfg: Config,
    *,
    task_info: dict | None = None,
    rollout_pool=None,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Train per `cfg`, write `summary.json`, `metrics.jsonl` and `final/` into `cfg.output.dir`; return the summary.

    `rollout_pool`: a running RolloutPool already serving the starting weights (version 0) to use for the
    online KL samples instead of starting one (iterative rounds share theirs); the caller shuts it down.
    `callbacks`: `spo_ray.Callback`s called in this process on each step, evaluation and checkpoint.
    """
    started = time.perf_counter()
    out = storage.output_location(cfg.output.dir)  # a local Path, or a RemotePath for a URI
    work = storage.work_dir(out)  # local scratch: `out` itself unless remote
    work.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    configure_logging(cfg.logging.level)  # before Ray starts: its workers and the engines inherit it
    ensure_ray(cfg)
    check_cluster_resources(cfg)  # before any work: a run the cluster cannot hold would wait forever
    watch = FirstStepWatch.start(cfg, out)  # says what the run waits for if no step comes within a minute
    ray.data.DataContext.get_current().enable_progress_bars = False  # the training bar is the one to watch

    model_dir = resolve_model_dir(cfg.model, work)
    reference_dir = cfg.model.reference_path or model_dir
    prepared, precomputed = prepare_training_data(cfg, model_dir, reference_dir, work)
    store = CheckpointStore(out / "checkpoints")
    latest, position = resume_point(store, cfg.train.keep_checkpoints)
    # before any engine starts: a stream that cannot fill a batch is a ConfigError
    shards = train_shards(prepared, **stream_position(cfg, prepared.num_train, position))
    held_out = eval_rows(cfg, prepared)
    pool = None
    try:
        pool, reg_prompts = start_online(cfg, model_dir, rollout_pool)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": config_to_dict(cfg),
                "model_dir": model_dir,
                "reference_dir": reference_dir,
                "pad_token_id": load_tokenizer(model_dir).pad_token_id,
                "output_dir": _for_workers(out),
                "rollout_pool": pool,
                "reg_prompts_ref": reg_prompts,
                "eval_rows": held_out,
                "ref_logps_precomputed": precomputed,
                "checkpoint_root": _for_workers(store.root),
                "resume_from": _for_workers(latest) if latest else None,
            },
            datasets=shards,
            dataset_config=shard_data_config(),
            **trainer_configs(cfg, store.root),
        )
        with RunWatcher(out, store, callbacks, after_step=position.step) as watcher:
            result = trainer.fit()
    except Exception as exc:
        if is_disk_full(exc):  # one message instead of each retry's traceback
            raise disk_full_error(
                work, store, f"a write failed with {shutil.disk_usage(work).free / 2**20:.1f} MiB free"
            ) from exc
        raise
    finally:
        watch.stop()
        if pool is not None and pool is not rollout_pool:
            pool.shutdown()
    watcher.raise_if_failed()
    stopped = result.return_value or {}  # rank 0's: the workers stopped together before a save
    if stopped.get("disk_full"):
        raise disk_full_error(work, store, stopped["disk_full"])
    summary = finish(cfg, out, store, model_dir, prepared, resumed_from=position.step, started=started)
    summary.update(task_info or {})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def prepare_training_data(cfg: Config, model_dir: str, reference_dir: str, work: Path):
    """(prepared data, whether its rows carry precomputed reference log-probs): tokenized, with the columns
    the loss reads scored once before training (`train.precompute_ref_logps`, SPPO's prev_logps)."""
    prepared = prepare_preference_data(cfg.data, model_dir, str(work))
    for note in prepared.notes():  # what was cut, skipped or not read: nothing is dropped without a word
        print(note, flush=True)
    spec = get_loss(cfg.loss.name)
    precomputed = cfg.train.precompute_ref_logps and needs_reference(spec)
    if precomputed:
        if not precomputable(spec):
            raise ConfigError(
                "train.precompute_ref_logps", f"loss {cfg.loss.name} needs reference logits every step"
            )
        prepared = add_reference_logps(
            prepared, reference_dir, cfg.model.dtype, work / "reference_logps", **scoring_actors(cfg)
        )
    for column in scored_at_start(spec):  # e.g. SPPO's prev_logps: lp_t(y) under this round's start policy
        prepared = add_reference_logps(
            prepared, model_dir, cfg.model.dtype, work / column, column=column, **scoring_actors(cfg)
        )
    for column in scored_with_base(spec):  # seqpo's base_logps: lp_0 under the first stage's start model
        if cfg.loss.seqpo_base_path and not Path(cfg.loss.seqpo_base_path).is_dir():
            raise ConfigError(
                "loss.seqpo_base_path",
                f"{cfg.loss.seqpo_base_path!r} is not a model folder; give the first stage's starting model",
            )
        prepared = add_reference_logps(
            prepared,
            cfg.loss.seqpo_base_path or reference_dir,
            cfg.model.dtype,
            work / column,
            column=column,
            **scoring_actors(cfg),
        )
    return prepared, bool(precomputed)


def resume_point(store: CheckpointStore, keep: int) -> tuple[storage.AnyPath | None, TrainState]:
    """The newest complete checkpoint and its position (a fresh run: None and step 0), after the folders a
    killed run left half-written are removed."""
    kept = store.prune(keep)
    store.remove_finished_runs()
    latest = kept[-1][1] if kept else None
    if latest is None:
        return None, TrainState()
    position = read_state(latest)
    print(f"resuming from {latest} (step {position.step})", flush=True)
    return latest, position


def stream_position(cfg: Config, num_examples: int, position: TrainState) -> dict:
    """`train_shards` arguments: the data stream starts at the checkpoint's position and covers the rest."""
    return {
        "world_size": cfg.train.num_workers,
        "seed": cfg.data.shuffle_seed,
        "epoch": position.epoch,
        "start": position.consumed_in_epoch,
        "num_epochs": epochs_needed(cfg, num_examples, position.consumed_in_epoch, position.step),
    }


def eval_rows(cfg: Config, prepared):
    """The eval rows, read once into the object store (the workers split them by rank); None without any."""
    if prepared.eval_rows is not None and prepared.num_eval:
        return ray.put(prepared.eval_rows.read(np.arange(prepared.num_eval)))
    if cfg.train.eval_every:
        print(
            f"train.eval_every={cfg.train.eval_every}: there are no eval rows (set data.eval_files or "
            "data.eval_fraction), so the run does not evaluate",
            flush=True,
        )
    return None


def start_online(cfg: Config, model_dir: str, rollout_pool=None):
    """(rollout pool, regularization prompts in the object store) for the global KL; (None, None) without it."""
    if not draws_online_samples(cfg):
        if cfg.logging.samples_every:
            print(
                "logging.samples_every: this run draws no online samples (loss.kl_coef=0 or loss.kl_on=dataset "
                "starts no rollout), "
                "so no samples.jsonl is written",
                flush=True,
            )
        return None, None
    from spo_ray.rollout import RolloutPool

    # in the object store, not in train_loop_config (which Ray pickles into every worker's start)
    reg_prompts = ray.put(PromptSet.from_lists(load_reg_prompts(cfg.data, model_dir)))
    return rollout_pool or RolloutPool.from_config(
        model_dir, cfg.rollout, lora_rank=cfg.model.lora.r
    ), reg_prompts


def trainer_configs(cfg: Config, checkpoint_root: storage.AnyPath) -> dict:
    """TorchTrainer's scaling and run configs."""
    return {
        "scaling_config": ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        "run_config": RunConfig(
            # a new Ray run per driver start: Ray's own record of an earlier one may name a checkpoint
            # the store pruned (Ray refuses to start then); the store reads every run's folders
            name=f"{RUN_NAME}_{time.strftime('%Y%m%d-%H%M%S')}",
            **_ray_storage(checkpoint_root),
            # CheckpointStore prunes (it also sees folders Ray never recorded); Ray keeps every one it did
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray_logging_config(cfg.logging.level),  # the controller's and workers' lines
        ),
    }


def finish(
    cfg: Config, out, store: CheckpointStore, model_dir: str, prepared, *, resumed_from: int, started: float
) -> dict:
    """Export the final model (and LoRA adapter) from the newest checkpoint; the run's summary (its wall
    time counted from `started`, a `time.perf_counter()` value)."""
    final_dir = store.prune(cfg.train.keep_checkpoints)[-1][1]
    store.remove_finished_runs()
    adapter_out = out / "final_adapter" if cfg.model.lora.r > 0 and cfg.model.lora.save_adapter else None
    export_final_model(cfg.model, model_dir, final_dir, out / "final", adapter_out)
    metrics = read_metrics(out)
    pair_rates = [m["pairs_per_s"] for m in metrics if "pairs_per_s" in m]
    summary = {
        "steps": read_state(final_dir).step,
        "resumed_from_step": resumed_from,
        "final_metrics": metrics[-1] if metrics else {},
        "wall_seconds": round(time.perf_counter() - started, 2),
        "pairs_per_second": round(sum(pair_rates) / len(pair_rates), 4) if pair_rates else 0.0,
        "bad_rows": prepared.bad_rows,
        "data": prepared.summary(),
        "loss": cfg.loss.name,
        "final_model": str(out / "final"),
        **({"final_adapter": str(adapter_out)} if adapter_out else {}),
        "checkpoint": str(final_dir),
    }
    if prepared.num_eval:  # the evaluation after the last step (train.eval_every; README: Metrics)
        summary["eval"] = {k: v for k, v in summary["final_metrics"].items() if k.startswith(EVAL_PREFIX)}
    return summary


def _for_workers(path: storage.AnyPath) -> str | storage.RemotePath:
    """A local path travels to the workers as text; a RemotePath as itself (it carries its filesystem)."""
    return path if storage.is_remote(path) else str(path)


def _ray_storage(root: storage.AnyPath) -> dict:
    """RunConfig's storage arguments: a local path, or a path inside the remote location's filesystem."""
    if storage.is_remote(root):
        return {"storage_path": root.path, "storage_filesystem": root.fs}
    return {"storage_path": str(root), "storage_filesystem": None}


def disk_full_error(out: Path, store: CheckpointStore, what: str) -> DiskFullError:
    """One message for a full disk: which filesystem, how much is free, and where a re-run resumes."""
    usage = shutil.disk_usage(out)
    latest = store.latest()
    resume = (
        f"the last complete checkpoint is {latest} (step {read_state(latest).step}); "
        if latest
        else "no complete checkpoint was written, so a re-run starts from step 0; "
    )
    return DiskFullError(
        f"no space left on the filesystem holding {out} ({usage.total / 2**20:.1f} MiB in all): {what}. "
        f"{resume}free some space (or lower train.keep_checkpoints) and run "
        "the same command again to resume"
    )
