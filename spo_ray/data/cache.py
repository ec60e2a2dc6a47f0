"""The tokenized-data cache: one key for the input contents, the tokenizer and the settings; atomic folders.

`OUTPUT/data/<key>/` holds the parts, the merged quarantine and `manifest.json`. A folder is built under a
`.tmp-*` name and renamed into place only once complete, so a preparation killed midway is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from spo_ray.data.sources import Source

CACHE_VERSION = 1  # bump when the part format or what tokenization writes changes
MANIFEST = "manifest.json"
_BLOCK = 1 << 20
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".onnx")
_TOKENIZER_FILES = (
    "tokenizer",
    "special_tokens_map",
    "vocab",
    "merges",
    "added_tokens",
    "chat_template",
    "spiece",
)


def _hash_file(path: str, digest: Any) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)


def _hash_folder(folder: str, digest: Any, keep=lambda name: True) -> None:
    """Every file under `folder` that `keep` accepts: its relative path and its bytes, in a fixed order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if keep(name):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, folder).encode() + b"\0")
                _hash_file(path, digest)


def source_digest(source: Source) -> str:
    """A content hash of one input: a file's bytes, a `save_to_disk` folder's files; a hub name is taken as is."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{source.kind}\0{source.path}\0{source.split}\0{source.config}\0".encode())
    if source.kind == "disk" or (source.kind == "hub" and os.path.isdir(source.path)):
        _hash_folder(source.path, digest)  # a local load_dataset folder: its files
    elif source.kind != "hub":  # a hub dataset is keyed by its name, config and split only (README.md)
        _hash_file(source.path, digest)
    return digest.hexdigest()


def tokenizer_digest(folder: str) -> str:
    """A hash of the tokenizer's files in a model folder (all non-weight files when none is recognized)."""
    digest = hashlib.blake2b(digest_size=16)

    def tokenizer_file(name: str) -> bool:
        return name.startswith(_TOKENIZER_FILES) or name.endswith(".model")

    names = [name for _, _, files in os.walk(folder) for name in files]
    if any(tokenizer_file(name) for name in names):
        _hash_folder(folder, digest, tokenizer_file)
    else:
        _hash_folder(folder, digest, lambda name: not name.endswith(_WEIGHTS))
    return digest.hexdigest()


def cache_key(sources: list[Source], tokenizer_path: str, settings: dict[str, Any]) -> tuple[str, dict]:
    """(key, what it was made of): input contents, tokenizer files, tokenization settings, CACHE_VERSION."""
    inputs = {
        "version": CACHE_VERSION,
        "sources": [[s.kind, s.path, s.split, s.config, s.group, source_digest(s)] for s in sources],
        "tokenizer": tokenizer_digest(tokenizer_path),
        "settings": settings,
    }
    text = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.blake2b(text, digest_size=10).hexdigest(), inputs


def read_manifest(root: str, key: str) -> dict | None:
    """The manifest of the complete cache folder for `key`, or None when there is none."""
    path = os.path.join(root, key, MANIFEST)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("version") == CACHE_VERSION else None


@contextmanager
def building(root: str, key: str) -> Iterator[str]:
    """A fresh temporary folder to build the cache for `key` in; on success (the caller has written
    MANIFEST into it) it is renamed to `root/key` and older cache folders are removed; on error it goes."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # what a killed preparation left
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = os.path.join(root, f".tmp-{key}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        if not os.path.exists(os.path.join(tmp, MANIFEST)):
            raise RuntimeError(f"cache folder {tmp} has no {MANIFEST}")
        final = os.path.join(root, key)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete or older-version folder of the same key
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in os.listdir(root):  # caches of other files, tokenizers or settings
        path = os.path.join(root, name)
        if name != key and os.path.isfile(os.path.join(path, MANIFEST)):
            shutil.rmtree(path, ignore_errors=True)


def write_manifest(folder: str, manifest: dict) -> None:
    """Write MANIFEST last (and durably): its presence marks the folder complete."""
    path = os.path.join(folder, MANIFEST)
    with open(path + ".part", "w", encoding="utf-8") as fh:
        json.dump({**manifest, "version": CACHE_VERSION}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path + ".part", path)
