"""Cross-field rules of the KL regularizer's keys (`loss.kl_on`, `loss.target_entropy`) and of the rollout that
samples for it (`rollout.*`), and whether a run draws online samples (and so starts a rollout pool)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spo_ray.errors import ConfigError

if TYPE_CHECKING:
    from spo_ray.config import Config


def draws_online_samples(cfg: Config) -> bool:
    """Whether the run samples from the policy online (and so starts a rollout pool): the KL regularizer is on
    (loss.kl_coef > 0) and taken on the policy's own samples (loss.kl_on=online)."""
    return cfg.loss.kl_coef > 0 and cfg.loss.kl_on == "online"


def check_regularizer(cfg: Config) -> None:
    """loss.kl_on and loss.target_entropy against the rest of loss:."""
    loss = cfg.loss
    if loss.kl_on == "dataset" and loss.kl_coef == 0:
        raise ConfigError(
            "loss.kl_on", "dataset takes the KL regularizer on the rows' responses; set loss.kl_coef > 0 too"
        )
    if loss.target_entropy > 0:
        if not loss.name.startswith("spo"):
            raise ConfigError(
                "loss.target_entropy",
                f"adapts SPO's alpha, and loss.name={loss.name} has none; use an SPO loss or set it to 0",
            )
        if loss.entropy_on == "samples" and not draws_online_samples(cfg):
            raise ConfigError(
                "loss.target_entropy",
                "is measured on the policy's online samples: set loss.kl_coef > 0 and loss.kl_on=online "
                f"(now kl_coef={loss.kl_coef:g}, kl_on={loss.kl_on}), or measure it with loss.entropy_on=compared, "
                "or set it to 0",
            )


def check_rollout(cfg: Config) -> None:
    """The `rollout` section's cross-field rules: ConfigError naming the key."""
    if cfg.rollout.lora_sync == "adapter" and (cfg.rollout.backend != "vllm" or cfg.model.lora.r == 0):
        raise ConfigError(
            "rollout.lora_sync",
            "adapter syncs a LoRA adapter to vLLM engines: it needs rollout.backend=vllm and model.lora.r > 0 "
            f"(got backend={cfg.rollout.backend}, r={cfg.model.lora.r}); use auto or merged",
        )
    if cfg.rollout.transport != "object_store" and cfg.rollout.num_gpus_per_actor <= 0:
        raise ConfigError(
            "rollout.transport",
            f"{cfg.rollout.transport} needs GPU rollout actors (rollout.num_gpus_per_actor > 0)",
        )
    for name, amount in cfg.rollout.resources.items():
        if name in ("CPU", "GPU", "memory"):
            raise ConfigError(
                f"rollout.resources.{name}",
                f"{name} is set by rollout.num_{name.lower()}s_per_actor"
                if name != "memory"
                else "memory is not a rollout placement resource; name a custom resource such as rollout",
            )
        if amount <= 0:
            raise ConfigError(f"rollout.resources.{name}", f"{amount!r} must be greater than 0")
    needed_lag = cfg.rollout.sync_every - 1 + int(cfg.rollout.overlap)
    if draws_online_samples(cfg) and cfg.rollout.max_policy_lag < needed_lag:
        raise ConfigError(
            "rollout.max_policy_lag",
            f"{cfg.rollout.max_policy_lag} is below the lag that sync_every={cfg.rollout.sync_every} and "
            f"overlap={cfg.rollout.overlap} produce ({needed_lag}); raise it or sync more often",
        )
