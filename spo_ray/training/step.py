"""One training step's loss assembly: preference terms + the global-KL regularizer, and the step's metrics.

No Ray here: the loop in `loop.py` hands in a collated preference batch and (optionally) online samples, and
gets back the loss to backpropagate plus detached metrics. The preference terms come from `terms.py` (one
policy forward over every response, laid out by `layouts.py`), the regularizer from `samples.py` (a second
forward over the online samples). Forwards run under the context's autocast; the loss math in float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from spo_ray.data.collate import PreferenceBatch
from spo_ray.losses import preference_metrics, trl_metrics
from spo_ray.training.context import StepContext
from spo_ray.training.dataset_kl import dataset_kl_metrics, dataset_kl_output
from spo_ray.training.degree import degree_terms
from spo_ray.training.entropy_dial import COMPARED, compared_entropy
from spo_ray.training.samples import SampleBatch, kl_metrics, kl_regularizer_output
from spo_ray.training.terms import ResponseForwards, preference_terms


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, with gradient
    metrics: dict[str, float]
    num_tokens: int


def compute_step(ctx: StepContext, batch: PreferenceBatch, samples: SampleBatch | None) -> StepOutput:
    """Loss = mean preference loss [+ λ · degree cross-entropy] + c_KL · mean KL surrogate on the online samples
    (SPEC.md §2), or on the batch's own responses with `ctx.kl_on == "dataset"` (`dataset_kl.py`); the degree
    term when `ctx.degree` is set (loss.sspo_lambda)."""
    forwards = ResponseForwards(ctx, batch)
    terms = preference_terms(ctx, batch, forwards)
    pref_loss = ctx.spec.compute(terms, ctx.params).mean()
    loss = pref_loss
    metrics = {"pref_loss": pref_loss.item()}
    metrics.update({k: v.item() for k, v in preference_metrics(terms).items()})
    # TRL's names; rewards/* only where this step has reference log-probs (reference-based losses)
    metrics.update({k: v.mean().item() for k, v in trl_metrics(terms, ctx.params.beta).items()})
    if ctx.entropy_on == "compared":  # loss.target_entropy measured on the batch's compared responses
        metrics[COMPARED] = compared_entropy(batch, terms.policy_logps)
    num_tokens = int(batch.response_lengths.sum() + batch.prompt_lengths.sum())
    if ctx.degree is not None:  # Li et al.'s L = L_align + λ·L_ssl (training/degree.py)
        degree_ce, degree_acc = degree_terms(ctx, batch)
        loss = loss + ctx.degree.weight * degree_ce.mean()
        metrics.update(sspo_loss=degree_ce.mean().item(), sspo_acc=degree_acc.mean().item())
    if ctx.kl_on == "dataset" and ctx.kl_coef > 0:
        kl = dataset_kl_output(ctx, forwards)
        loss = loss + ctx.kl_coef * kl.loss.mean()
        metrics.update(dataset_kl_metrics(kl))
    if samples is not None and ctx.kl_coef > 0 and ctx.kl_on == "online":
        started = time.perf_counter()
        kl, sample_logps, entropy = kl_regularizer_output(ctx, samples)
        if kl.loss.is_cuda:
            torch.cuda.synchronize(kl.loss.device)
        # the KL forwards' own compute (policy and reference on the samples): the online step's floor is the
        # offline step plus this (bench/bench_online.py, online_overhead_vs_compute_floor)
        metrics["kl_forward_seconds"] = time.perf_counter() - started
        loss = loss + ctx.kl_coef * kl.loss.mean()
        metrics.update(kl_metrics(kl, sample_logps, entropy, samples, ctx.entropy_min_prob))
        num_tokens += int(samples.attention_mask.sum().item())
    metrics["loss"] = loss.item()
    return StepOutput(loss=loss, metrics=metrics, num_tokens=num_tokens)
