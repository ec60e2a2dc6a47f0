"""What a run asks of the cluster: checked before any work, and said aloud while the run waits for it."""

from __future__ import annotations

import os
import threading
import time

import ray

from spo_ray import storage
from spo_ray.config import Config, draws_online_samples
from spo_ray.errors import ConfigError

DATA_TASK_CPUS = 1  # the least Ray Data's read/tokenize tasks need beside the trainers and engines
WAIT_NOTE_AFTER_S = 60.0  # a run with no training step after this long says what it waits for


def resources_asked(cfg: Config) -> list[tuple[str, str, float, float]]:
    """(config key, what it is, CPUs, GPUs) of each part of the run that holds resources while training."""
    t, r = cfg.train, cfg.rollout
    parts = [
        (
            "train.num_workers",
            f"trainers (train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g}"
            + (", one GPU each: train.use_gpu" if t.use_gpu else "")
            + ")",
            t.num_workers * t.cpus_per_worker,
            float(t.num_workers) if t.use_gpu else 0.0,
        )
    ]
    if draws_online_samples(cfg):
        parts.append(
            (
                "rollout.num_actors",
                f"rollout engines (rollout.num_actors={r.num_actors} x rollout.num_cpus_per_actor="
                f"{r.num_cpus_per_actor:g}, started as loss.kl_coef > 0, kl_on=online)",
                r.num_actors * r.num_cpus_per_actor,
                r.num_actors * r.num_gpus_per_actor,
            )
        )
    parts.append(("", f"Ray Data's read tasks (at least {DATA_TASK_CPUS})", float(DATA_TASK_CPUS), 0.0))
    return parts


def _asked_text(parts: list[tuple[str, str, float, float]]) -> str:
    return "; ".join(
        f"{what}: {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "") for _, what, cpus, gpus in parts
    )


def check_cluster_resources(cfg: Config) -> None:
    """Refuse (ConfigError naming the keys) a run the cluster cannot hold, before any work is done.

    Trainers, rollout engines and Ray Data's tasks all hold CPUs at once while training; if together
    they exceed the cluster, the run would wait forever. With train.cluster_autoscales it warns instead.
    """
    _check_rollout_placement(cfg)
    parts = resources_asked(cfg)
    total = ray.cluster_resources()
    cpus, gpus = sum(p[2] for p in parts), sum(p[3] for p in parts)
    short = []
    if cpus > total.get("CPU", 0.0):
        short.append(f"{cpus:g} CPUs, but the cluster has {total.get('CPU', 0.0):g}")
    if gpus > total.get("GPU", 0.0):
        short.append(f"{gpus:g} GPUs, but the cluster has {total.get('GPU', 0.0):g}")
    cores = os.cpu_count() or 1
    trainer_cpus = parts[0][2]
    if not os.environ.get("RAY_ADDRESS") and trainer_cpus > cores:
        short.append(f"{trainer_cpus:g} CPUs for trainers, but this machine has {cores} cores")
    if not short:
        return
    key = max(parts, key=lambda p: (p[2], bool(p[0])))[0] or "train.num_workers"
    if gpus > total.get("GPU", 0.0) and cfg.train.use_gpu:
        key = "train.use_gpu"
    if key == "train.use_gpu":
        advice = "Set train.use_gpu=false, or run on a cluster with GPUs"
    else:
        others = " or rollout.num_actors" if key == "train.num_workers" and draws_online_samples(cfg) else ""
        advice = f"Lower {key}{others}, or run on a bigger cluster"
    message = (
        f"the run asks for {' and '.join(short)} (ray.cluster_resources()): {_asked_text(parts)}. {advice}; "
        f"if this cluster adds nodes by itself, set train.cluster_autoscales=true"
    )
    if cfg.train.cluster_autoscales:
        print(f"spo-ray: warning: config key '{key}': {message}; waiting for the autoscaler", flush=True)
        return
    raise ConfigError(key, message)


def _check_rollout_placement(cfg: Config) -> None:
    """Refuse a run whose rollout.resources / rollout.node_labels no live node offers (its engines could not start)."""
    r = cfg.rollout
    if not draws_online_samples(cfg) or cfg.train.cluster_autoscales or not (r.resources or r.node_labels):
        return
    from spo_ray.rollout.placement import Placement

    placement = Placement(r.num_cpus_per_actor, r.num_gpus_per_actor, r.resources, r.node_labels)
    if not placement.fitting_nodes():
        raise ConfigError(
            "rollout.resources" if r.resources else "rollout.node_labels", placement.no_node_text()
        )


class FirstStepWatch:
    """A driver thread that says what the run asked for and what is free if no training step came yet.

    Prints after WAIT_NOTE_AFTER_S, then every 5 times that, until `stop()` or the first step lands in
    `metrics.jsonl`. Starting a watch stops the previous one (a run that raised leaves none behind)."""

    _current: FirstStepWatch | None = None

    def __init__(self, cfg: Config, output_dir: storage.AnyPath, after_s: float | None = None):
        self.asked = _asked_text(resources_asked(cfg))
        self.metrics = storage.location(output_dir) / "metrics.jsonl"  # local, or remote (spo_ray.storage)
        self.after_s = WAIT_NOTE_AFTER_S if after_s is None else after_s
        self.started = time.time()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spo-ray-first-step-watch", daemon=True)

    @classmethod
    def start(cls, cfg: Config, output_dir: storage.AnyPath) -> FirstStepWatch:
        """Start watching (and stop the watch of an earlier run in this process)."""
        if cls._current is not None:
            cls._current.stop()
        cls._current = watch = cls(cfg, output_dir)
        watch._thread.start()
        return watch

    def stop(self) -> None:
        """No more notes."""
        self._stopped.set()

    def _stepped(self) -> bool:
        return self.metrics.exists() and self.metrics.stat().st_mtime >= self.started

    def _run(self) -> None:
        wait = self.after_s
        while not self._stopped.wait(min(wait, 1.0)):
            if self._stepped():
                return
            if time.time() - self.started < wait:
                continue
            try:
                free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
                total = {k: round(v, 2) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            except Exception as exc:  # the note must never break the run; say what went wrong instead
                free = total = {"unknown": repr(exc)}
            print(
                f"spo-ray: no training step after {time.time() - self.started:.0f} s. The run asked for {self.asked}; "
                f"the cluster has {total} of which {free} is free now (ray.available_resources()). "
                f"If nothing is free and this persists, the run is waiting for resources other jobs or actors "
                f"hold: free them, or lower train.num_workers / rollout.num_actors",
                flush=True,
            )
            wait += 5 * self.after_s
