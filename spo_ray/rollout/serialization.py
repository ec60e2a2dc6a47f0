"""State dicts as safetensors bytes: one serialization on the trainer, zero-copy views on the engines."""

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
    return np.frombuffer(save(unique), dtype=np.uint8)


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
