"""The self-supervised preference degree head of `loss.sspo_lambda` (Li et al., arXiv 2409.17791): its module,
optimizer, extra forward, gradient sync and checkpoint file.

Each step, the chosen response of every row is degraded into K versions (`spo_ray.losses.degree`: degree k
removes about k/K of its key tokens); `prompt + degraded response` for all B·K of them go through the policy
in one extra forward (right-padded, the model's own causal mask). The head reads the policy's final hidden
states (those the LM head would read), mean-pooled over the degraded response's positions, and a linear
layer gives K logits: `L_ssl = mean CE(head(pool(h)), k)`, added to the pairwise loss as `λ·L_ssl`, its
gradient reaching both the head and the policy. The paper does not say how its classifier reads the model;
mean pooling over the response and one linear layer is our choice.

The head lives outside the policy, so the policy stays a plain causal LM (the rollout's weight sync, the
exported final model and the checkpoint's model file hold no extra tensor). It has its own AdamW, stepped
with the policy's current learning rate, its gradients averaged over ranks by one all-reduce per optimizer
step (DDP and FSDP alike), and one checkpoint file (`DEGREE_FILE`, weights + optimizer state), in rank 0's
manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spo_ray.data.collate import PreferenceBatch
from spo_ray.losses.degree import degraded_versions, degree_loss
from spo_ray.training.checkpointing import DEGREE_FILE
from spo_ray.training.layouts import _unwrap
from spo_ray.training.optim import build_optimizer


@dataclass
class DegreeAux:
    """The head, its optimizer and the term's settings (`loss.sspo_lambda`, `loss.sspo_levels`, `train.seed`)."""

    head: nn.Linear  # [H] -> [K]
    optimizer: torch.optim.Optimizer
    weight: float  # λ
    levels: int  # K
    seed: int

    @classmethod
    def build(cls, policy: nn.Module, weight: float, levels: int, seed: int, train_cfg, device) -> DegreeAux:
        """A fresh head for `policy`'s hidden size, initialized from `seed` (the same on every rank)."""
        lm_head = _unwrap(policy).get_output_embeddings()
        hidden = lm_head.in_features if lm_head is not None else _unwrap(policy).config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        head = nn.Linear(hidden, levels)
        with torch.no_grad():
            bound = 1 / hidden**0.5
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.zero_()
        head = head.to(device)
        optimizer, _ = build_optimizer(head, train_cfg)  # the policy's AdamW settings; `step` sets its lr
        return cls(head, optimizer, weight, levels, seed)

    def step(self, lr: float, max_grad_norm: float, world: int) -> None:
        """Average the gradients over ranks, clip, and step with the policy's learning rate `lr`."""
        params = [p for p in self.head.parameters() if p.grad is not None]
        if world > 1:
            for param in params:
                torch.distributed.all_reduce(param.grad)
                param.grad /= world
        if max_grad_norm > 0 and params:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path) -> None:
        torch.save(
            {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()},
            directory / DEGREE_FILE,
        )

    def load(self, directory: Path, load) -> bool:
        """Restore from `directory`'s file (read with `load`); False when the checkpoint has none."""
        path = directory / DEGREE_FILE
        if not path.exists():
            return False
        state = load(path)
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        return True


@dataclass
class DegradedBatch:
    """`prompt + degraded chosen response` of every row at every degree: [B·K, L] right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # [B·K, L] long
    response_mask: torch.Tensor  # [B·K, L] float, 1 on the degraded response's tokens
    labels: torch.Tensor  # [B·K] long, the degree k; row b's degrees at b·K .. b·K + K − 1


def degraded_batch(batch: PreferenceBatch, levels: int, seed: int, pad_token_id: int = 0) -> DegradedBatch:
    """Degrade the chosen response (`ranking[:, 0]`) of every row of `batch` (padded or packed)."""
    n = batch.num_responses
    flat = batch.input_ids.reshape(-1).tolist()
    width = batch.input_ids.shape[1]
    starts = (
        batch.cu_seqlens[:-1].tolist() if batch.packed else [k * width for k in range(batch.num_sequences)]
    )
    sequences, labels = [], []
    for row, (best, example_id) in enumerate(zip(batch.ranking[:, 0].tolist(), batch.example_ids.tolist())):
        if best < 0:
            raise ValueError(
                "loss.sspo_lambda > 0 degrades each row's chosen response, and this batch has rows without a "
                "preference order (SPPO self-play rows): set loss.sspo_lambda=0 for them"
            )
        k = row * n + best
        p, r = int(batch.prompt_lengths[k]), int(batch.response_lengths[k])
        prompt, response = flat[starts[k] : starts[k] + p], flat[starts[k] + p : starts[k] + p + r]
        for level, degraded in enumerate(degraded_versions(response, levels, seed, example_id)):
            sequences.append((prompt, degraded))
            labels.append(level)
    longest = max(len(p) + len(r) for p, r in sequences)
    device = batch.input_ids.device
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), longest), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), longest))
    for i, (prompt, response) in enumerate(sequences):
        input_ids[i, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        attention[i, : len(prompt) + len(response)] = 1
        response_mask[i, len(prompt) : len(prompt) + len(response)] = 1
    return DegradedBatch(
        input_ids.to(device),
        attention.to(device),
        response_mask.to(device),
        torch.tensor(labels, device=device),
    )


def final_hidden_states(model: nn.Module, inputs: dict, autocast) -> torch.Tensor:
    """[rows, L, H] hidden states the LM head reads, from one forward through `model` itself (DDP and PEFT see a
    normal call). A pre-hook hands the LM head one position only, so no [rows, L, V] logits are computed."""
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        with autocast:
            return model(**inputs, output_hidden_states=True).hidden_states[-1]
    kept: dict[str, torch.Tensor] = {}

    def keep(module, args):
        kept["hidden"] = args[0]
        return (args[0][:, :1], *args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        with autocast:
            model(**inputs)
    finally:
        handle.remove()
    return kept["hidden"]


def degree_terms(ctx, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row [B] cross-entropy and accuracy of the degree head over the row's K degraded chosen responses
    (with gradient to the head and the policy when enabled)."""
    aux: DegreeAux = ctx.degree
    degraded = degraded_batch(batch, aux.levels, aux.seed)
    inputs = {"input_ids": degraded.input_ids, "attention_mask": degraded.attention_mask, "use_cache": False}
    hidden = final_hidden_states(ctx.policy, inputs, ctx.autocast())
    mask = degraded.response_mask.to(aux.head.weight.dtype)  # the head's float32 (mixed precision upcast)
    pooled = (hidden.to(mask.dtype) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B·K, H]
    loss, correct = degree_loss(aux.head(pooled), degraded.labels)
    return loss.view(-1, aux.levels).mean(-1), correct.view(-1, aux.levels).mean(-1)
