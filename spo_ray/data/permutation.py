"""Deterministic epoch order: a keyed, invertible permutation of example ids (no table held in memory)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def derive_key(seed: int, *purpose: Any) -> int:
    """A 64-bit key from a seed and a purpose (e.g. ('epoch', 3)); stable across runs and platforms."""
    text = ":".join(map(str, (seed, *purpose))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _round_keys(key: int) -> list[np.uint64]:
    return [np.uint64(derive_key(key, "round", r)) for r in range(_ROUNDS)]


def _half_bits(n: int) -> int:
    return max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # domain 4**half >= n


def _check(values: np.ndarray, n: int, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() >= n):
        raise ValueError(f"{name}: values must lie in [0, {n})")
    return values


def permute(values: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n) applied elementwise: balanced Feistel network plus cycle walking."""
    values = _check(values, n, "permute")
    half = _half_bits(n)
    mask = np.uint64((1 << half) - 1)
    round_keys = _round_keys(key)
    out = values.astype(np.uint64)
    todo = np.ones(out.shape, dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            x = out[todo]
            left, right = x >> np.uint64(half), x & mask
            for round_key in round_keys:
                left, right = right, left ^ (_mix(right ^ round_key) & mask)
            out[todo] = (left << np.uint64(half)) | right
            todo = out >= np.uint64(n)
    return out.astype(np.int64)


def inverse_permute(values: np.ndarray, n: int, key: int) -> np.ndarray:
    """The inverse of `permute(., n, key)`: the rounds undone in reverse order, cycle-walking back into [0, n)."""
    values = _check(values, n, "inverse_permute")
    half = _half_bits(n)
    mask = np.uint64((1 << half) - 1)
    round_keys = _round_keys(key)[::-1]
    out = values.astype(np.uint64)
    todo = np.ones(out.shape, dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            x = out[todo]
            left, right = x >> np.uint64(half), x & mask
            for round_key in round_keys:
                left, right = right ^ (_mix(left ^ round_key) & mask), left
            out[todo] = (left << np.uint64(half)) | right
            todo = out >= np.uint64(n)
    return out.astype(np.int64)
