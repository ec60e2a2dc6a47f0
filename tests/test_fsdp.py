"""FSDP2 on two CPU ranks over gloo, through the functions the training loop calls: the gradient norm is the
global one, checkpoints hold the full tensors and resume into shards exactly, and the weights synced to the
rollout are the full model's. The unsharded model, stepped on both ranks' batches, is the reference."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spo_ray.config import TrainConfig
from spo_ray.rollout.weights import state_dict_for_sync
from spo_ray.train.checkpointing import MODEL_FILE, TrainState, load_checkpoint, save_checkpoint
from spo_ray.train.optim import build_optimizer
from spo_ray.train.parallel import _fully_shard, clip_grad_norm

WORLD, MAX_NORM = 2, 0.5
TRAIN_CFG = TrainConfig(max_steps=4, warmup_steps=0, lr=1e-3)


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(100 * step + rank))


def _sharded(model_dir):
    model = _fully_shard(AutoModelForCausalLM.from_pretrained(model_dir), torch.device("cpu"))
    return model, *build_optimizer(model, TRAIN_CFG)


def _fsdp_step(model, optimizer, scheduler, rank: int, step: int) -> float:
    ids = _batch(rank, step)
    model(input_ids=ids, labels=ids).loss.backward()  # FSDP2 reduce-scatters the mean gradient
    norm = clip_grad_norm(model.parameters(), MAX_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _unsharded_step(model, optimizer, scheduler, step: int) -> float:
    """What the ranks together should do: the mean of both ranks' gradients, clipped by its own norm."""
    for rank in range(WORLD):
        ids = _batch(rank, step)
        (model(input_ids=ids, labels=ids).loss / WORLD).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _rank_main(rank: int, model_dir: str, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        full = AutoModelForCausalLM.from_pretrained(model_dir)
        full_optimizer, full_scheduler = build_optimizer(full, TRAIN_CFG)
        model, optimizer, scheduler = _sharded(model_dir)
        assert type(next(model.parameters())).__name__ == "DTensor"  # really sharded
        for step in (1, 2):
            norm = _fsdp_step(model, optimizer, scheduler, rank, step)
            expected = _unsharded_step(full, full_optimizer, full_scheduler, step)
            # a per-shard norm would be about expected / sqrt(2) on each rank, and differ between them
            assert expected > MAX_NORM and abs(norm - expected) <= 1e-4 * expected, (
                rank,
                step,
                norm,
                expected,
            )

        checkpoint = os.path.join(out_dir, "checkpoint")
        save_checkpoint(
            checkpoint,
            rank=rank,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            state=TrainState(step=2),
        )
        synced = state_dict_for_sync(model)  # every rank gathers; rank 0 gets the weights
        dist.barrier()
        saved = load_file(os.path.join(checkpoint, MODEL_FILE))
        assert set(saved) == set(full.state_dict())  # HF names
        for name, param in model.named_parameters():  # the file holds every rank's shard, in order
            assert torch.equal(saved[name].chunk(WORLD)[rank], param.to_local()), name
        if rank == 0:
            assert set(synced) == set(saved) and all(torch.equal(synced[n], saved[n]) for n in saved)
            # and it trained as the unsharded model did (Adam may flip the sign of a step on a ~0 gradient)
            gap = max((saved[n] - t).abs().mean().item() for n, t in full.state_dict().items())
            assert gap < 1e-5, gap
        else:
            assert synced == {}

        # resume into fresh shards: the next step equals the uninterrupted run's, optimizer moments included
        resumed, resumed_optimizer, resumed_scheduler = _sharded(model_dir)
        state = load_checkpoint(
            checkpoint, rank=rank, model=resumed, optimizer=resumed_optimizer, scheduler=resumed_scheduler
        )
        assert state.step == 2
        assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
        _fsdp_step(model, optimizer, scheduler, rank, 3)
        _fsdp_step(resumed, resumed_optimizer, resumed_scheduler, rank, 3)
        after, resumed_after = state_dict_for_sync(model), state_dict_for_sync(resumed)
        if rank == 0:
            assert all(torch.equal(after[name], resumed_after[name]) for name in after)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(300)
def test_fsdp_clips_by_the_global_norm_and_checkpoints_syncs_and_resumes_full_weights(
    tiny_model_dir, tmp_path
):
    mp.spawn(_rank_main, args=(str(tiny_model_dir), str(tmp_path), _free_port()), nprocs=WORLD)
    assert (tmp_path / "checkpoint" / MODEL_FILE).exists()
