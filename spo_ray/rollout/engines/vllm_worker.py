"""Methods mixed into vLLM's workers (`worker_extension_cls`): reload weights from safetensors bytes."""

from __future__ import annotations

from typing import Any


class WeightReloadExtension:
    """Reached with `LLM.collective_rpc("reload_safetensors", args=(payload,))`.

    After loading, vLLM's CPU build repacks linear layers, so `model.load_weights` cannot run twice;
    `model_runner.reload_weights` restores the checkpoint layout, loads, and repacks again.
    Tensors do not survive RPC serialization intact, hence bytes.
    """

    model_runner: Any

    def reload_safetensors(self, payload: Any) -> None:
        from spo_ray.rollout.serialization import bytes_to_state_dict

        state_dict = bytes_to_state_dict(payload)
        self.model_runner.reload_weights(weights_iterator=iter(state_dict.items()))
