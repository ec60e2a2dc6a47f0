"""State dicts on their way to the engines: object-store buckets of numpy views (zero-copy on both ends), or
safetensors bytes where tensors must cross a process boundary as plain bytes (vLLM workers in other processes)."""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import torch
from safetensors.torch import save

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def state_dict_to_bytes(state_dict: dict[str, torch.Tensor]) -> np.ndarray:
    """Serialize CPU tensors to safetensors bytes, as a uint8 array (Ray puts arrays out of band).

    Tensors sharing storage (tied embeddings) are written once, under the first name.
    """
    unique = _unique_contiguous(state_dict)
    return np.frombuffer(save(unique), dtype=np.uint8)


def _unique_contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage (tied embeddings) once, under the first name."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    unique: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict['{name}'] is a {type(tensor).__name__}, not a torch.Tensor")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.contiguous()
    return unique


def bytes_to_state_dict(payload: bytes | memoryview | np.ndarray) -> dict[str, torch.Tensor]:
    """Read safetensors bytes into tensors that view the buffer (no copy); callers copy them into a model."""
    buffer = memoryview(payload).cast("B")
    (header_len,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(bytes(buffer[8 : 8 + header_len]))
    base = 8 + header_len
    state_dict: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we only read it
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            if end == start:
                state_dict[name] = torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(buffer[base + start : base + end], dtype=dtype)
            state_dict[name] = flat.view(shape)
    return state_dict


# -- object-store buckets: numpy views of the tensors, copied once into shared memory by ray.put ---------

BUCKET_BYTES = (
    256 << 20
)  # one object-store object holds up to this many bytes of tensors (one tensor may exceed)

# numpy has no bfloat16: such tensors travel as int16 and are viewed back on arrival.
_VIEW_AS = {torch.bfloat16: torch.int16}
_TORCH_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in _DTYPES.values()}


def state_dict_to_buckets(
    state_dict: dict[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES
) -> list[dict[str, list]]:
    """Split CPU tensors into buckets of numpy views (no copy here: `ray.put` of a bucket is the one copy).

    A bucket is `{"names", "dtypes", "arrays"}`, tensors grouped by dtype so each bucket is one flat run of
    memory in the object store; tied tensors go once. `buckets_to_state_dict` reads them back in place.
    """
    unique = sorted(_unique_contiguous(state_dict).items(), key=lambda item: str(item[1].dtype))
    buckets: list[dict[str, list]] = []
    size = bucket_bytes
    for name, tensor in unique:
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > bucket_bytes or (buckets and buckets[-1]["dtypes"][-1] != _dtype_name(tensor)):
            buckets.append({"names": [], "dtypes": [], "arrays": []})
            size = 0
        bucket = buckets[-1]
        bucket["names"].append(name)
        bucket["dtypes"].append(_dtype_name(tensor))
        bucket["arrays"].append(tensor.view(_VIEW_AS.get(tensor.dtype, tensor.dtype)).numpy())
        size += nbytes
    return buckets


def buckets_to_state_dict(buckets: list[dict[str, list]]) -> dict[str, torch.Tensor]:
    """Tensors that view the buckets' arrays (in an engine: the object store's shared memory, no copy)."""
    state_dict: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable": we only read it
        for bucket in buckets:
            for name, dtype, array in zip(bucket["names"], bucket["dtypes"], bucket["arrays"]):
                state_dict[name] = torch.from_numpy(array).view(_TORCH_DTYPES[dtype])
    return state_dict


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
