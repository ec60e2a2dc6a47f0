"""Held-out evaluation during training (`train.eval_every`, and once at the last step): TRL's metric names.

The driver reads the eval rows once and puts them in the object store; rank r of W evaluates rows r, r+W, ...
so each row is counted once, and the per-rank sums are all-reduced. Every rank runs the same number of
forwards (a short shard repeats a row with weight 0): DDP's buffer sync and FSDP's all-gathers are collectives.
Reference log-probs of the eval rows are scored once per worker start, with the run's reference (the loaded
copy, the adapter-free LoRA policy, or a copy loaded for that scoring alone and freed), so every run, SPO
included, gets `eval/rewards/*` and later evaluations cost policy forwards only.

Evaluation runs in eval mode (no dropout), without gradients and inside `torch.random.fork_rng`: the training
data stream and every RNG continue as if it had not run, so a resumed run stays exact.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from spo_ray.data import collate_preference_batch
from spo_ray.losses import PreferenceTerms, trl_metrics
from spo_ray.training.context import StepContext
from spo_ray.training.degree import degree_terms
from spo_ray.training.metrics import EVAL_PREFIX
from spo_ray.training.terms import (
    carries_columns,
    policy_response_logps,
    preference_terms,
    reference_response_logps,
)

_COLUMNS = ("example_id", "prompt_ids", "response_ids", "ranking")


class Evaluator:
    """This rank's share of the eval rows, batched; `evaluate()` returns the `eval/*` metrics of every rank's rows."""

    def __init__(
        self,
        rows,
        ctx: StepContext,
        *,
        batch_size: int,
        rank: int,
        world: int,
        pad_token_id: int,
        packing: bool,
        device,
        load_reference: Callable[[], torch.nn.Module] | None = None,
    ):
        """`rows`: a pyarrow Table of tokenized eval rows (or an object ref to one). `load_reference`: builds a
        prepared reference when `ctx` has none (called once, for the first evaluation's scoring)."""
        import ray

        if isinstance(rows, ray.ObjectRef):
            rows = ray.get(rows)
        self.columns = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in _COLUMNS}
        self.num_rows = rows.num_rows
        self.ctx, self.world, self.device = ctx, world, device
        self.pad_token_id, self.packing = pad_token_id, packing
        self.load_reference = load_reference
        mine = np.arange(rank, self.num_rows, world)
        longest_shard = math.ceil(self.num_rows / world)
        num_batches = math.ceil(longest_shard / batch_size)  # the same on every rank
        self.batches: list[tuple[np.ndarray, torch.Tensor]] = []  # (row indices, weights [b])
        for k in range(num_batches):
            take = mine[k * batch_size : (k + 1) * batch_size]
            weight = torch.ones(len(take))
            if not len(take):  # this rank's shard is shorter: one forward on row 0 that counts for nothing
                take, weight = np.zeros(1, dtype=np.int64), torch.zeros(1)
            self.batches.append((take, weight))
        self.ref_logps: list[torch.Tensor] | None = None  # [b, n] per batch, scored at the first evaluation

    def _batch(self, take: np.ndarray):
        rows = {name: values[take] for name, values in self.columns.items()}
        return collate_preference_batch(rows, self.pad_token_id, packing=self.packing).to(self.device)

    def _score_reference(self) -> list[torch.Tensor]:
        ctx = self.ctx
        if ctx.reference is None and ctx.reference_mode is None:
            ctx = dataclasses.replace(ctx, reference=self.load_reference())
        return [reference_response_logps(ctx, self._batch(take)) for take, _ in self.batches]

    def _row_metrics(self, batch) -> dict[str, torch.Tensor]:
        """Per-row [b] values: the preference loss (unless it reads columns held-out rows lack, e.g. SPPO's
        judged win_prob) and TRL's metrics."""
        ctx = self.ctx
        if carries_columns(ctx.spec, batch):
            terms = preference_terms(ctx, batch)  # reads batch.ref_logps instead of a reference forward
            values = {"loss": ctx.spec.compute(terms, ctx.params)}
        else:
            terms = PreferenceTerms(policy_logps=policy_response_logps(ctx, batch), ranking=batch.ranking)
            values = {}
        terms = dataclasses.replace(terms, ref_logps=batch.ref_logps)
        values.update(trl_metrics(terms, ctx.params.beta))
        if ctx.degree is not None:  # loss.sspo_lambda: the degree head on the held-out rows' chosen responses
            values["sspo_loss"], values["sspo_acc"] = degree_terms(ctx, batch)
        return values

    def evaluate(self) -> dict[str, float]:
        """`eval/<name>` means over every eval row (all ranks), plus `eval/rows` and `eval/seconds`."""
        start = time.perf_counter()
        policy = self.ctx.policy
        was_training = policy.training
        devices = [self.device] if torch.device(self.device).type == "cuda" else []
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), dtype=torch.float64)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            policy.eval()  # no dropout (LoRA's included) in the policy or in its adapter-free reference mode
            try:
                if self.ref_logps is None:
                    self.ref_logps = self._score_reference()
                for (take, weight), ref_logps in zip(self.batches, self.ref_logps):
                    batch = dataclasses.replace(self._batch(take), ref_logps=ref_logps)
                    for name, values in self._row_metrics(batch).items():
                        total = (values.double().cpu() * weight.double()).sum()
                        sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64)) + total
                    count += weight.double().sum()
            finally:
                policy.train(was_training)
        names = sorted(sums)  # the same names in the same order on every rank
        packed = torch.stack([*(sums[name] for name in names), count])  # float64: gloo and NCCL reduce it
        if self.world > 1:
            packed = packed.to(self.device)
            torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        rows = float(packed[-1])
        out = {EVAL_PREFIX + name: float(packed[i]) / rows for i, name in enumerate(names)}
        out[EVAL_PREFIX + "rows"] = rows
        out[EVAL_PREFIX + "seconds"] = time.perf_counter() - start
        return out


def eval_due(step: int, max_steps: int, eval_every: int) -> bool:
    """Evaluate after this optimizer step: every `eval_every` steps (0: never in between) and at the last."""
    return step == max_steps or (eval_every > 0 and step % eval_every == 0)
