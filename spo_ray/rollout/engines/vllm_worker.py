"""Methods mixed into vLLM's workers (`worker_extension_cls`): reload weights from tensors or safetensors bytes.

Two ways to load new weights into a running engine:

- in place (CPU engines with `rollout.cpu_weights=in_place`, the default): `model.load_weights` copies each
  tensor into the parameter it belongs to (q/k/v and gate/up into their fused slices). One copy of the bytes.
  With `cpu_weights=shared` a parameter that takes one whole checkpoint tensor unchanged (the embedding, LM
  head, norms, o_proj, down_proj) serves the tensor itself, a view of the object store's shared memory, and
  only the fused slices are copied: the trainer's `ray.put` is then most of a sync's copying.
- a reload (GPU engines, `cpu_weights=packed`, quantized models): `model_runner.reload_weights` restores every
  layer's checkpoint layout, loads, and runs each layer's post-load processing again. vLLM's CPU build needs
  it when it packs linear layers for oneDNN: the packing drops the `weight` parameter, so there is nothing to
  copy into, and every sync allocates, copies and packs again (bench/RESULTS.md, "Weight sync").

`keep_cpu_linear_weights` (called before the engine loads, `rollout.cpu_weights=in_place`) makes vLLM's CPU
linear layers run torch's `F.linear` on their loaded weights instead of packing them, so loads stay in place.
"""

from __future__ import annotations

from typing import Any

import torch

CPU_WEIGHTS = ("in_place", "packed", "shared")  # rollout.cpu_weights
# Loaders that copy a whole checkpoint tensor into a parameter of its shape when unsharded (TP 1; None:
# vLLM's default_weight_loader): such a parameter may take the tensor itself. Fused (q/k/v, gate/up),
# padded (a vocabulary not a multiple of 64) or transformed weights keep their own memory.
WHOLE_TENSOR_LOADERS = {
    None,
    "default_weight_loader",
    "VocabParallelEmbedding.weight_loader",
    "RowParallelLinear.weight_loader",
    "RowParallelLinear.weight_loader_v2",
    "ReplicatedLinear.weight_loader",
}


def _vllm_layer_utils() -> Any:
    """vLLM's `model_executor.layers.utils` (home of its CPU GEMM dispatch), or None without vLLM."""
    try:
        from vllm.model_executor.layers import utils
    except ImportError:
        return None
    return utils


def _keeping_weights() -> bool:
    """Whether `keep_cpu_linear_weights` is in effect in this process."""
    dispatch = getattr(_vllm_layer_utils(), "dispatch_cpu_unquantized_gemm", None)
    return getattr(dispatch, "keeps_weights", False)


def keep_cpu_linear_weights() -> None:
    """From now on in this process, vLLM's CPU build keeps every 2-D linear weight (the layers and the LM head)
    and computes with `F.linear` on it, rather than packing it for oneDNN and dropping it. Without such a
    dispatch (a GPU build, or a vLLM version that changed it) nothing changes: engines then reload."""
    utils = _vllm_layer_utils()
    packing = getattr(utils, "dispatch_cpu_unquantized_gemm", None)
    if packing is None or _keeping_weights():
        return

    def keep_weights(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2 or layer.weight.is_meta:  # convolutions, MoE experts, missing layers
            packing(layer, remove_weight)
            return
        layer.cpu_linear = _plain_linear

    keep_weights.keeps_weights = True  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = keep_weights  # vLLM imports it from utils at each call


def _plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def loads_in_place(model: torch.nn.Module, quantized: bool) -> bool:
    """Whether loads copy into `model`'s parameters: `keep_cpu_linear_weights` is on in this process (CPU
    engines; post-load processing then only picks `F.linear`), no parameter was dropped by packing, and no
    quantization method transforms the weights after loading."""
    return _keeping_weights() and not quantized and all(p.numel() > 0 for p in model.parameters())


def load_in_place(model: torch.nn.Module, weights: dict[str, Any], share: bool = False) -> None:
    """Copy `weights` (checkpoint names) into the model's parameters; every parameter must be among them, as
    vLLM's own loader requires (LoRA-wrapped layers name theirs `.base_layer.`; the loader reports them
    without). With `share`, parameters that take a whole tensor unchanged become that tensor instead
    (`shareable`), once everything else has loaded; the tensors must stay unchanged while the model serves
    them (object-store objects do)."""
    params = {name.replace(".base_layer.", "."): param for name, param in model.named_parameters()}
    shared = shareable(params, weights) if share else {}
    for name, param in params.items():
        if name not in shared and getattr(param, "shares_weights", False):
            param.data = param.data.clone()  # it served a shared tensor: its own memory again, same values
            param.shares_weights = False
    rest = {name: tensor for name, tensor in weights.items() if name not in shared}
    loaded = set(model.load_weights(weights=iter(rest.items()))) | set(shared)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(
            f"the weights leave {len(missing)} parameters of the rollout model unloaded, e.g. {missing[:3]}"
        )
    for name, tensor in shared.items():
        params[name].data = tensor
        params[name].shares_weights = True


def shareable(params: dict[str, torch.nn.Parameter], weights: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of `weights` that a parameter may serve as they are: `WHOLE_TENSOR_LOADERS` would copy the
    whole tensor into it (same name, shape, dtype and device, tensor parallelism 1)."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    if get_tensor_model_parallel_world_size() != 1:
        return {}
    out = {}
    for name, tensor in weights.items():
        param = params.get(name)
        if (
            param is not None
            and _loader_name(param) in WHOLE_TENSOR_LOADERS
            and param.shape == tensor.shape
            and param.dtype == tensor.dtype
            and param.device == tensor.device
            and tensor.is_contiguous()
        ):
            out[name] = tensor
    return out


def _loader_name(param: torch.nn.Parameter) -> str | None:
    loader = getattr(param, "weight_loader", None)
    return None if loader is None else getattr(loader, "__qualname__", repr(loader))


class WeightReloadExtension:
    """Reached with `LLM.collective_rpc("reload_tensors", args=(state_dict,))`, or `reload_safetensors`.

    Loads in place when the model allows it (`loads_in_place`), else reloads (module docstring).
    Tensors do not survive RPC serialization intact, so workers in other processes get bytes.
    """

    model_runner: Any

    def reload_safetensors(self, payload: Any) -> None:
        from spo_ray.rollout.serialization import bytes_to_state_dict

        self.reload_tensors(bytes_to_state_dict(payload))

    def reload_tensors(self, state_dict: dict[str, Any], share: bool = False) -> None:
        """Load tensors handed over in-process (they may view the object store's shared memory; with `share`,
        the engine keeps them, and with them the objects, as its weights until the next load)."""
        if self.weights_load_in_place():
            load_in_place(self.model_runner.model, state_dict, share=share)
        else:
            self.model_runner.reload_weights(weights_iterator=iter(state_dict.items()))

    def shared_weight_bytes(self) -> int:
        """Bytes of this worker's parameters that serve a shared tensor (`load_in_place` with `share`)."""
        params = self.model_runner.model.parameters()
        return sum(p.numel() * p.element_size() for p in params if getattr(p, "shares_weights", False))

    def weights_load_in_place(self) -> bool:
        """Whether this worker's loads are in place (decided once: loads keep the weights' layout)."""
        if getattr(self, "_in_place", None) is None:
            quantized = self.model_runner.vllm_config.quant_config is not None
            self._in_place = loads_in_place(self.model_runner.model, quantized)
        return self._in_place
