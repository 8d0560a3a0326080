"""File identity, hashing and the cache: what every step that reads or caches a file shares.

A file is identified by its resolved path, mtime and size; its sha256 is computed once per
process for an unchanged file. Cached results (subsamples, replay labels, the base model's
errors) live under one root, named by a digest of what they depend on, and are written
atomically so that parallel trials never read half a file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where generated files live: `$PET_LORA_SWEEPER_CACHE` or the user's cache folder."""
    root = os.environ.get("PET_LORA_SWEEPER_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pet-lora-sweeper"
    return Path(root)


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """What a file's content is taken to depend on: its resolved path, mtime and size."""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256, computed once per process for an unchanged file."""
    return _sha256(file_identity(path))


@functools.lru_cache(maxsize=64)  # a sweep's trials hash the same data and checkpoint
def _sha256(identity: tuple[str, int, int]) -> str:
    digest = hashlib.sha256()
    with open(identity[0], "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached(kind: str, key: dict[str, Any] | str, suffix: str) -> Path:
    """The cache file of `kind` for `key`: a name given as is, or a digest of what it depends on."""
    if not isinstance(key, str):
        key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / kind / f"{key}{suffix}"


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` (same suffix) to write, moved onto `path` when the block
    ends without error: parallel trials never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
