"""FSDP2 on two CPU ranks over gloo. Through the functions the training loop calls (two spawned processes): the
gradient norm is the global one, checkpoints hold the full tensors and resume into shards exactly, and the
weights synced to the rollout are the full model's; the unsharded model stepped on every rank's batches is
the reference. Through Ray Train: a DDP run's checkpoint resumes under FSDP and trains on exactly as DDP does."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spo_ray.config import TrainConfig
from spo_ray.rollout.weights import state_dict_for_sync
from spo_ray.training.checkpointing import (
    MODEL_FILE,
    CheckpointStore,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from spo_ray.training.optim import build_optimizer
from spo_ray.training.parallel import _fully_shard, clip_grad_norm, gradient_sync

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORLD, MAX_NORM = 2, 0.5
TRAIN_CFG = TrainConfig(max_steps=4, warmup_steps=0, lr=1e-3)

MICRO = 2  # micro-batches per step: the first accumulates without reduce-scatter (gradient_sync)


def _batch(rank: int, step: int, micro: int) -> torch.Tensor:
    seed = 100 * step + 10 * micro + rank
    return torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(seed))


def _sharded(model_dir):
    model = _fully_shard(AutoModelForCausalLM.from_pretrained(model_dir), torch.device("cpu"))
    return model, *build_optimizer(model, TRAIN_CFG)


def _fsdp_step(model, optimizer, scheduler, rank: int, step: int) -> float:
    for micro in range(MICRO):  # as the loop does: FSDP2 reduce-scatters the mean gradient at the last one
        ids = _batch(rank, step, micro)
        with gradient_sync(model, micro == MICRO - 1):
            (model(input_ids=ids, labels=ids).loss / MICRO).backward()
    norm = clip_grad_norm(model.parameters(), MAX_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _unsharded_step(model, optimizer, scheduler, step: int) -> float:
    """What the ranks together should do: the mean of every rank's gradients, clipped by its own norm."""
    for rank in range(WORLD):
        for micro in range(MICRO):
            ids = _batch(rank, step, micro)
            (model(input_ids=ids, labels=ids).loss / (WORLD * MICRO)).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _lora_model(model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the same adapters every call
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # lora_B starts at zero: give the adapters a delta
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


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

        # LoRA over a sharded base: rank 0 merges the adapters from the gathered full state
        lora, unsharded_lora = _lora_model(model_dir), _lora_model(model_dir)
        synced = state_dict_for_sync(_fully_shard(lora, torch.device("cpu")))
        if rank == 0:
            expected = unsharded_lora.merge_and_unload().state_dict()
            assert list(synced) == list(expected)
            assert all(torch.equal(synced[name], expected[name]) for name in expected)
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


def _run_job(out, strategy: str) -> list[dict]:
    from spo_ray.config import load_config
    from spo_ray.tasks import run_job

    cfg = load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [
            "task.num_pairs=200",
            "task.reference_fit_steps=20",
            "loss.name=dpo",  # the reference forwards on the workers every step: sharded under FSDP
            "loss.kl_coef=0",
            "train.precompute_ref_logps=false",
            "train.num_workers=2",
            f"train.strategy={strategy}",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.max_steps=4",
            "train.checkpoint_every=2",
            "train.warmup_steps=1",
            "train.max_grad_norm=0.5",  # below these steps' norms: every step is clipped
            "data.eval_fraction=0.1",  # 20 held-out rows, evaluated by both ranks at steps 2 and 4
            "train.eval_every=2",
            "logging.progress=false",
            "logging.wandb_mode=disabled",
            f"output.dir={out}",
        ],
    )
    run_job(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_ddp_checkpoint_resumes_under_fsdp_and_trains_exactly_as_ddp_goes_on(ray_runtime, tmp_path):
    ddp = _run_job(tmp_path / "ddp", "ddp")
    shutil.copytree(tmp_path / "ddp", tmp_path / "fsdp")  # then keep only the step-2 checkpoint
    for step, folder in CheckpointStore(tmp_path / "fsdp" / "checkpoints").complete():
        if step > 2:
            shutil.rmtree(folder)
    fsdp = _run_job(tmp_path / "fsdp", "fsdp")
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["resumed_from_step"] == 2
    for ours, theirs in zip(fsdp[2:], ddp[2:], strict=True):  # steps 3 and 4: FSDP from DDP's step-2 state
        assert ours["step"] == theirs["step"] and theirs["grad_norm"] > 0.5
        for key in ("loss", "grad_norm"):  # the global norm: a per-shard one would be about 1/sqrt(2) of it
            assert abs(ours[key] - theirs[key]) <= 1e-4 * abs(theirs[key]), (key, ours, theirs)
    # the evaluation after the last step (sharded policy and reference under FSDP) agrees with DDP's
    assert ddp[-1]["eval/rows"] == fsdp[-1]["eval/rows"] == 20 and "eval/rows" in ddp[1]
    for key in ("eval/loss", "eval/rewards/chosen", "eval/rewards/margins", "eval/logps/rejected"):
        assert fsdp[-1][key] == pytest.approx(ddp[-1][key], rel=1e-4, abs=1e-6), key

    weights = {
        name: load_file(str(CheckpointStore(tmp_path / name / "checkpoints").latest() / MODEL_FILE))
        for name in ("ddp", "fsdp")
    }
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "tiny_model").state_dict()
    assert {k: v.shape for k, v in weights["fsdp"].items()} == {k: v.shape for k, v in start.items()}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    for name, tensor in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(exported[name], weights["fsdp"][name]), name
