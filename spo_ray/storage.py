"""Where a run's outputs live: a local path, or a filesystem URI (s3://, gs://, file://, ...) read through pyarrow.fs.

`location(text)` gives a `pathlib.Path` for a plain path or a `file://` URI, and a `RemotePath` for an object
store: the few `Path` methods the trainer uses (`/`, `read_text`, `write_bytes`, `stat`, `iterdir`, ...) over a
pyarrow `FileSystem`. Code written against those methods runs unchanged on both; the helpers below cover what
`Path` has no method for (walking a tree, deleting one, copying one between a bucket and a local folder).

A `RemotePath` pickles with its filesystem (endpoint and region included, credentials not), so Ray workers on
other nodes reach the same bucket with their own credentials (the node's environment or instance role).
Object stores have no append and no rename: a file is written whole (one PUT, atomic), and appended files such
as metrics.jsonl are kept in a local staging folder (`work_dir`) and uploaded whole at checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from spo_ray.errors import ConfigError

# object stores pyarrow opens as bucket/key paths (file:// is a local path); the URI may carry pyarrow's query
# options, e.g. s3://bucket/run?endpoint_override=localhost:9000&scheme=http
REMOTE_SCHEMES = ("s3", "gs", "gcs")
WORK_DIR_ENV = "SPO_RAY_WORK_DIR"  # where a remote run keeps its local scratch (default: the temp dir)


class RemotePath:
    """A file or folder in a pyarrow FileSystem, with the subset of `pathlib.Path` the trainer uses."""

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str):
        self.fs, self.path, self.scheme = fs, path.rstrip("/"), scheme

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path}/{name}", self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, str(PurePosixPath(self.path).parent), self.scheme)

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        return PurePosixPath(self.path).relative_to(other.path)

    def resolve(self) -> RemotePath:
        return self

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> SimpleNamespace:
        """st_size and st_mtime; a folder (an object store has none) reports its newest file's time."""
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        if info.type == pafs.FileType.Directory:
            files = self.fs.get_file_info(pafs.FileSelector(self.path))
            times = [f.mtime.timestamp() for f in files if f.mtime is not None]
            return SimpleNamespace(st_size=0, st_mtime=max(times, default=0.0))
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return SimpleNamespace(st_size=info.size, st_mtime=mtime)

    def iterdir(self) -> Iterator[RemotePath]:
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)):
            yield RemotePath(self.fs, info.path, self.scheme)

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def open(self, mode: str = "rb"):
        """A binary stream: "rb" reads, "wb" writes the whole object when closed."""
        if mode == "rb":
            if not self.exists():
                raise FileNotFoundError(str(self))
            return self.fs.open_input_stream(self.path)
        if mode == "wb":
            return self.fs.open_output_stream(self.path)
        raise ValueError(f"{self}: only 'rb' and 'wb' are supported on {self.scheme}://, not {mode!r}")

    def read_bytes(self) -> bytes:
        with self.open("rb") as fh:
            return fh.read()

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def write_bytes(self, data: bytes) -> None:
        with self.open("wb") as fh:
            fh.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))


AnyPath = Path | RemotePath


@functools.lru_cache(maxsize=32)
def _filesystem(base_uri: str) -> pafs.FileSystem:
    """One filesystem per scheme://host?options (opening one may ask the store for the bucket's region)."""
    return pafs.FileSystem.from_uri(base_uri)[0]


def scheme_of(text: str) -> str:
    """The URI scheme of `text`, lower-cased; "" for a plain path (a Windows drive letter counts as a path)."""
    scheme = urlsplit(str(text)).scheme.lower()
    return "" if len(scheme) <= 1 else scheme


def check_scheme(text: str, key: str) -> None:
    """Raise ConfigError naming `key` when `text` is a URI whose scheme no filesystem here opens."""
    scheme = scheme_of(text)
    if scheme and scheme != "file" and scheme not in REMOTE_SCHEMES:
        raise ConfigError(
            key,
            f"'{text}' has the scheme '{scheme}://', which spo_ray cannot write to; use a local path, "
            f"file://, or one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}",
        )


def location(text: str | os.PathLike | RemotePath) -> AnyPath:
    """A `Path` for a plain path or file:// URI, a `RemotePath` for a remote URI (see REMOTE_SCHEMES)."""
    if isinstance(text, (Path, RemotePath)):
        return text
    text = os.fspath(text)
    scheme = scheme_of(text)
    if not scheme:
        return Path(text)
    if scheme == "file":
        return Path(unquote(urlsplit(text).path))
    check_scheme(text, "")
    parts = urlsplit(text)
    fs = _filesystem(f"{scheme}://{parts.netloc}/" + (f"?{parts.query}" if parts.query else ""))
    bucket = parts.netloc.rsplit("@", 1)[-1]  # keys given as user:secret@ open the filesystem, never shown
    return RemotePath(fs, f"{bucket}{unquote(parts.path)}", scheme)


def is_remote(path) -> bool:
    return isinstance(path, RemotePath)


def output_location(text: str, key: str = "output.dir") -> AnyPath:
    """Open a run's output location and check it can be written; errors name `key` and what to do."""
    check_scheme(text, key)
    try:
        out = location(text)
        if not is_remote(out):
            out = out.resolve()
            out.mkdir(parents=True, exist_ok=True)
            return out
        probe = out / f".spo_ray_write_check_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.fs.delete_file(probe.path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            key,
            f"cannot write to '{text}': {exc}. Check that the bucket exists and that this machine and every "
            "Ray node have credentials for it (s3://: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
            "or an instance role, plus AWS_ENDPOINT_URL for an S3-compatible server; gs://: "
            "GOOGLE_APPLICATION_CREDENTIALS)",
        ) from None
    return out


def local_output(text: str, what: str, key: str = "output.dir") -> Path:
    """`text` as a resolved local Path (file:// allowed) for commands that write only local files; a remote
    URI raises ConfigError naming `key` and `what` needs local files."""
    check_scheme(text, key)
    out = location(text)
    if is_remote(out):
        raise ConfigError(
            key,
            f"'{text}' is remote, but {what} writes local files; use a local path or a shared mount (file://)",
        )
    return out.resolve()


def work_dir(out: AnyPath) -> Path:
    """Local scratch of a run: `out` itself when local; for a remote `out`, $SPO_RAY_WORK_DIR (or the temp
    dir) / spo_ray_work / <hash of the URI>, the same folder on every start of the same run on this machine."""
    if not is_remote(out):
        return Path(out)
    base = Path(os.environ.get(WORK_DIR_ENV) or tempfile.gettempdir()) / "spo_ray_work"
    digest = hashlib.sha1(str(out).encode()).hexdigest()[:16]
    return base / f"{out.name or 'run'}-{digest}"


def walk_files(root: AnyPath) -> list[tuple[AnyPath, list[str]]]:
    """(folder, file names) of every folder under `root` (none when it does not exist), like os.walk.

    Locally os.walk skips a folder deleted while it walks (another process pruning) where glob would raise."""
    if not is_remote(root):
        return [(Path(folder), names) for folder, _, names in os.walk(root)]
    selector = pafs.FileSelector(root.path, recursive=True, allow_not_found=True)
    folders: dict[str, list[str]] = {}
    for info in root.fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            parent = PurePosixPath(info.path)
            folders.setdefault(str(parent.parent), []).append(parent.name)
    return [(RemotePath(root.fs, folder, root.scheme), names) for folder, names in sorted(folders.items())]


def remove_tree(path: AnyPath) -> None:
    """Delete a folder and everything in it; a folder already gone is not an error."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        path.fs.delete_dir(path.path)


def upload_dir(local_dir: str | os.PathLike, target: AnyPath) -> None:
    """Copy a local folder's files to `target` (replacing what is there under the same names)."""
    if not is_remote(target):
        shutil.copytree(local_dir, target, dirs_exist_ok=True)
        return
    pafs.copy_files(
        str(Path(local_dir).resolve()),
        target.path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=target.fs,
    )


@contextlib.contextmanager
def local_copy(folder: str | os.PathLike | RemotePath) -> Iterator[Path]:
    """`folder` itself when local; a remote folder downloaded into a temporary local one, deleted after."""
    folder = location(folder)
    if not is_remote(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="spo_ray_download_") as tmp:
        started = time.perf_counter()
        pafs.copy_files(
            folder.path, tmp, source_filesystem=folder.fs, destination_filesystem=pafs.LocalFileSystem()
        )
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        print(
            f"downloaded {folder} ({size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        yield Path(tmp)
