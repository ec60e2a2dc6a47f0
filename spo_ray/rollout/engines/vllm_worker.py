"""Methods mixed into vLLM's workers (`worker_extension_cls`): reload weights from tensors or safetensors bytes."""

from __future__ import annotations

from typing import Any


class WeightReloadExtension:
    """Reached with `LLM.collective_rpc("reload_tensors", args=(state_dict,))`, or `reload_safetensors`.

    After loading, vLLM's CPU build repacks linear layers, so `model.load_weights` cannot run twice;
    `model_runner.reload_weights` restores the checkpoint layout, loads, and repacks again.
    Tensors do not survive RPC serialization intact, so workers in other processes get bytes.
    """

    model_runner: Any

    def reload_safetensors(self, payload: Any) -> None:
        from spo_ray.rollout.serialization import bytes_to_state_dict

        state_dict = bytes_to_state_dict(payload)
        self.model_runner.reload_weights(weights_iterator=iter(state_dict.items()))

    def reload_tensors(self, state_dict: dict[str, Any]) -> None:
        """Load tensors handed over in-process (they may view the object store's shared memory)."""
        self.model_runner.reload_weights(weights_iterator=iter(state_dict.items()))
