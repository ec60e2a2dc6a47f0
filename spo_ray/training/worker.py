"""This Ray Train worker's place in the group (rank, world size, device) and the collectives the loop uses."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch

from spo_ray.logs import configure_logging

# Metrics whose worst rank matters more than the mean: reduced with MAX instead.
_MAX_ACROSS_RANKS = (
    "policy_lag",
    "sync_bytes",
    "sync_bytes_other_nodes",
    "sync_load_seconds",
)  # rank 0 alone syncs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Worker:
    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls, seed: int, log_level: str) -> Worker:
        """This worker, with its logging set, its RNGs seeded per rank and Ray Data's bars off (one bar: training's)."""
        configure_logging(log_level)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        seed_everything(seed * 1000 + rank)
        return cls(rank, ctx.get_world_size(), ray.train.torch.get_device())

    @property
    def is_chief(self) -> bool:
        """Rank 0: it logs, sends the weights to the rollout and prunes checkpoints."""
        return self.rank == 0

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean over ranks (MAX for `_MAX_ACROSS_RANKS`), as float32 on the worker's device so NCCL reduces it."""
        if self.world == 1:
            return metrics
        out = {}
        for op, keys in (
            (torch.distributed.ReduceOp.SUM, sorted(k for k in metrics if k not in _MAX_ACROSS_RANKS)),
            (torch.distributed.ReduceOp.MAX, sorted(k for k in metrics if k in _MAX_ACROSS_RANKS)),
        ):
            if not keys:
                continue
            packed = torch.tensor([metrics[k] for k in keys], dtype=torch.float32, device=self.device)
            torch.distributed.all_reduce(packed, op=op)
            scale = self.world if op == torch.distributed.ReduceOp.SUM else 1
            out.update(zip(keys, (packed / scale).tolist()))
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any."""
        if self.world == 1:
            return flag
        packed = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
        return bool(packed.item())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
