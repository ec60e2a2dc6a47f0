"""Exact evaluation on the synthetic expert task: π_θ(y|x) on S(x) by teacher forcing, and its distances."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spo_ray.eval.distributions import entropy, kl_divergence, restrict_to_support, total_variation
from spo_ray.tasks.synthetic_expert.task import OUTSIDE_SCORE, SyntheticExpertTask


@dataclass
class CandidateBatch:
    """Every (prompt, candidate) of a task as one right-padded batch, row p·K + k for candidate k of prompt p."""

    input_ids: torch.Tensor  # [P*K, T]
    attention_mask: torch.Tensor  # [P*K, T]
    response_mask: torch.Tensor  # [P*K, T], True on the response tokens (content + end of turn)
    num_prompts: int
    num_candidates: int


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids: the user turn templated with the chat template and the generation prompt."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Response ids: the assistant turn's content followed by the end-of-turn (eos) token."""
    return tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def encode_candidates(tokenizer, task: SyntheticExpertTask) -> CandidateBatch:
    """Tokenize prompt ids + response ids for every candidate of every prompt (the data pipeline's rule)."""
    sequences, response_lengths = [], []
    for prompt, candidates in zip(task.prompts, task.candidates):
        prompt_ids = encode_prompt(tokenizer, prompt)
        for candidate in candidates:
            response_ids = encode_response(tokenizer, candidate)
            sequences.append(prompt_ids + response_ids)
            response_lengths.append(len(response_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (ids, response_length) in enumerate(zip(sequences, response_lengths)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, len(ids) - response_length : len(ids)] = True
    return CandidateBatch(input_ids, attention_mask, response_mask, task.num_prompts, task.num_candidates)


def candidate_logprobs(model, batch: CandidateBatch, chunk_size: int = 64) -> torch.Tensor:
    """log π_θ(y_k|x_p) [P, K] (float32): the sum of the response tokens' log-probs; keeps the graph."""
    device = next(model.parameters()).device
    sums = []
    for start in range(0, batch.input_ids.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        input_ids = batch.input_ids[rows].to(device)
        logits = model(input_ids=input_ids, attention_mask=batch.attention_mask[rows].to(device)).logits
        logits = logits[:, :-1].float()  # [n, T-1, V]; position t predicts token t+1
        labels = input_ids[:, 1:]  # [n, T-1]
        token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        mask = batch.response_mask[rows, 1:].to(device)
        sums.append(torch.where(mask, token_logps, 0.0).sum(-1))  # [n]
    return torch.cat(sums).view(batch.num_prompts, batch.num_candidates)


@torch.no_grad()
def response_logprobs(model, tokenizer, task: SyntheticExpertTask, chunk_size: int = 64) -> torch.Tensor:
    """log π_θ(y|x) for every candidate, [P, K] float64, exact by teacher forcing, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        logps = candidate_logprobs(model, encode_candidates(tokenizer, task), chunk_size)
    finally:
        model.train(was_training)
    return logps.double().cpu()


def response_distribution(model, tokenizer, task: SyntheticExpertTask, chunk_size: int = 64) -> torch.Tensor:
    """π_θ(y|x) for every candidate y ∈ S(x), [P, K] float64 (rows sum to the mass on S, ≤ 1)."""
    return response_logprobs(model, tokenizer, task, chunk_size).exp()


def model_distribution_on_s(model_dir: str, task: SyntheticExpertTask) -> torch.Tensor:
    """`response_distribution` of the Hugging Face model saved in `model_dir`, [P, K] float64."""
    from spo_ray.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(model_dir).eval()
    return response_distribution(model, load_tokenizer(model_dir), task)


# ---------------------------------------------------------------------------------------------------
# Distances between distributions over S (last dim), as plain functions


# ---------------------------------------------------------------------------------------------------
# Metrics


def expert_metrics(
    probs: torch.Tensor,
    task: SyntheticExpertTask,
    alpha: float,
    beta: float | None = None,
    reference: torch.Tensor | None = None,
) -> dict:
    """Metrics of a distribution π(y|x) on S [P, K] (a model's, or a table) against the task's targets.

    `reference` [P, K] is π_ref on S (renormalized here); it enables kl_to_reference_on_s and replaces q
    in DPO's optimum. Distances use π restricted to S and renormalized; mass_on_s is before that.
    """
    probs = probs.to(torch.float64)
    mass = probs.sum(-1)  # [P]
    learned = restrict_to_support(probs)  # [P, K]
    target = task.target_distribution(alpha)
    rewards = task.reward_tensor()
    per_prompt_tv = total_variation(learned, target)
    metrics = {
        "alpha": alpha,
        "tv_to_target": per_prompt_tv.mean().item(),
        "per_prompt_tv": per_prompt_tv.tolist(),
        "entropy": entropy(learned).mean().item(),
        "target_entropy": entropy(target).mean().item(),
        "mass_on_s": mass.mean().item(),
        "per_prompt_mass_on_s": mass.tolist(),
        "expected_reward": (learned * rewards).sum(-1).mean().item(),
        # E_{y~π}[judge(x, y)]: responses outside S score OUTSIDE_SCORE, so mass leaving S counts here
        "judge_expected_reward": ((probs * rewards).sum(-1) + (1 - mass).clamp(min=0) * OUTSIDE_SCORE)
        .mean()
        .item(),
        "target_expected_reward": (target * rewards).sum(-1).mean().item(),
    }
    ref_on_s = None if reference is None else restrict_to_support(reference.to(torch.float64))
    if beta is not None:
        metrics["beta"] = beta
        metrics["tv_to_dpo_optimum"] = (
            total_variation(learned, task.dpo_optimum(beta, ref_on_s)).mean().item()
        )
    if ref_on_s is not None:
        metrics["kl_to_reference_on_s"] = kl_divergence(learned, ref_on_s).mean().item()
    metrics["distribution_on_s"] = learned.tolist()
    return metrics


def evaluate_expert(
    model,
    tokenizer,
    task: SyntheticExpertTask,
    alpha: float,
    beta: float | None = None,
    reference: torch.Tensor | None = None,
) -> dict:
    """expert_metrics of an HF causal LM's exact distribution on S (see response_distribution)."""
    return expert_metrics(response_distribution(model, tokenizer, task), task, alpha, beta, reference)


def empirical_optimum(
    task: SyntheticExpertTask, rows: list[dict], alpha: float, ridge: float = 1e-4
) -> torch.Tensor:
    """The SPO optimum on S for a finite preference set [P, K]: softmax(θ/α), θ the Bradley–Terry MLE.

    The best distribution any learner can reach from these rows; its TV to softmax(r/α) is the data's
    floor. A small ridge on θ keeps it finite when a candidate never wins or never loses.
    """
    prompt_index = {prompt: p for p, prompt in enumerate(task.prompts)}
    winners, losers = [], []
    for row in rows:
        p = prompt_index[row["prompt"]]
        chosen = task.candidate_index(row["prompt"], row["chosen"])
        rejected = task.candidate_index(row["prompt"], row["rejected"])
        if chosen is None or rejected is None:
            raise ValueError(f"empirical_optimum: row {row} has a response outside S(x)")
        winners.append(p * task.num_candidates + chosen)
        losers.append(p * task.num_candidates + rejected)
    winners_t, losers_t = torch.tensor(winners), torch.tensor(losers)
    theta = torch.zeros(task.num_prompts * task.num_candidates, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        nll = -torch.nn.functional.logsigmoid(theta[winners_t] - theta[losers_t]).sum()
        loss = nll + ridge * theta.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.softmax(theta.detach().view(task.num_prompts, task.num_candidates) / alpha, dim=-1)
