"""A fixed-seed subsample of a large structure file, without parsing the rest of it.

An original set of 10,000 structures of which a trial uses 64 used to be parsed whole
(by ASE to check it, then by metatrain) before the subsample was taken. For extended
XYZ files (what `mtt train` and most DFT pipelines write) the frames are found from their
atom-count lines alone, the chosen frames are copied byte for byte into a small cached
file, and only that file is parsed. Other formats are read whole, as before.

The chosen structures are the first `limit` of one fixed-seed permutation of the file's
structure count; a second draw (`after`) continues the same permutation, so the two
never overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ase.io import read
from ase.io.formats import filetype

from sweeper.files import cached, file_sha256, written_atomically

FORMAT = 1  # bump when the cached files would differ


def permutation(count: int, seed: int) -> list[int]:
    """The fixed-seed order structures are drawn in (the same draw as before subsets were files)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def choose(count: int, limit: int | None, seed: int, after: int = 0) -> list[int]:
    """Sorted indices of `limit` structures (all when None), skipping the first `after` drawn."""
    if limit is None and after == 0:
        return list(range(count))
    order = permutation(count, seed)
    chosen = order[after:] if limit is None else order[after : after + limit]
    return sorted(chosen)


def is_extxyz(path: str | Path) -> bool:
    try:
        return filetype(str(path), read=True) in ("extxyz", "xyz")
    except Exception:  # unknown or unreadable: the full read reports it
        return False


def frame_offsets(path: str | Path) -> list[int]:
    """Byte offset of every frame of an (extended) XYZ file, from its atom-count lines."""
    offsets = []
    with open(path, "rb") as handle:
        while True:
            start = handle.tell()
            line = handle.readline()
            if not line:
                return offsets
            if not line.strip():  # blank lines between or after frames
                continue
            try:
                atoms = int(line)
            except ValueError:
                raise ValueError(f"{path}: byte {start} should start a frame with its atom count") from None
            offsets.append(start)
            for _ in range(atoms + 1):
                if not handle.readline():
                    raise ValueError(f"{path}: the frame at byte {start} is truncated")


def count(path: str | Path) -> int:
    """Structures in the file: counted from its atom-count lines when it is (extended) XYZ."""
    return len(frame_offsets(path)) if is_extxyz(path) else len(read(str(path), ":"))


class TooFewStructures(ValueError):
    """The file holds fewer structures than two disjoint draws need."""

    def __init__(self, path: str | Path, count: int, wanted: int) -> None:
        super().__init__(f"{path} holds {count} structures, {wanted} are needed")
        self.count = count


def check_room(path: str | Path, count: int, limit: int, after: int) -> None:
    if after and after + limit > count:
        raise TooFewStructures(path, count, after + limit)


def subset_file(path: str | Path, limit: int, seed: int, after: int = 0) -> tuple[Path, list[int]] | None:
    """A cached extended-XYZ file of the chosen frames of `path` and their indices, or None
    when `path` is not (extended) XYZ or every structure is chosen. A draw after the first
    `after` structures (replay, after the retained-accuracy subset) must fit in the file."""
    if not is_extxyz(path):
        return None
    subset = cached("subsets", f"{file_sha256(path)[:24]}-n{limit}-a{after}-s{seed}-v{FORMAT}", ".xyz")
    listing = subset.with_suffix(".json")
    if subset.is_file() and listing.is_file():
        return subset, json.loads(listing.read_text())["indices"]
    offsets = frame_offsets(path)
    check_room(path, len(offsets), limit, after)
    if after == 0 and limit >= len(offsets):
        return None
    indices = choose(len(offsets), limit, seed, after)
    ends = [*offsets[1:], Path(path).stat().st_size]
    with written_atomically(subset) as tmp, open(path, "rb") as source, open(tmp, "wb") as target:
        for index in indices:
            source.seek(offsets[index])
            target.write(source.read(ends[index] - offsets[index]))
    with written_atomically(listing) as tmp:  # last: its presence says the subset is whole
        tmp.write_text(json.dumps({"source": str(path), "count": len(offsets), "indices": indices}))
    return subset, indices
