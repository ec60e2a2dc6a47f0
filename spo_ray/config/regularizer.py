"""Cross-field rules of the KL regularizer's keys (`loss.kl_on`, `loss.target_entropy`), and whether a run
draws online samples (and so starts a rollout pool)."""

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
        if not draws_online_samples(cfg):
            raise ConfigError(
                "loss.target_entropy",
                "is measured on the policy's online samples: set loss.kl_coef > 0 and loss.kl_on=online "
                f"(now kl_coef={loss.kl_coef:g}, kl_on={loss.kl_on}), or set it to 0",
            )
