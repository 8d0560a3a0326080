"""The trial's datasets: fine-tuning train/validation(/test) and the original set.

Every file is checked (exists, readable, has the configured labels, finite values, a
cell where stress is asked for) before anything is trained, so a bad path or key is a
one-line error naming the file and the key. A large original set is subsampled before
it is parsed (sweeper/subsample.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.io import iread

from sweeper import embedded, subsample
from sweeper import metatrain as mtt
from sweeper.config import Config, ConfigError
from sweeper.files import file_identity, file_sha256


@dataclass
class Datasets:
    train: mtt.Dataset
    validation: mtt.Dataset
    test: mtt.Dataset | None
    original: mtt.Dataset | None
    target_info: dict
    atomic_types: list[int]  # of the fine-tuning data
    labels: dict[str, mtt.Labels]  # "finetune", "original"
    sha256: dict[str, str] = field(default_factory=dict)  # role -> file hash (the whole file)
    original_indices: list[int] | None = None  # the structures of the original file used


def labels_of(cfg: Config) -> mtt.Labels:
    return mtt.Labels(
        energy_key=cfg.energy_key,
        energy_unit=cfg.energy_unit,
        forces_key=cfg.forces_key if cfg.forces else None,
        stress_key=cfg.stress_key if cfg.stress else None,
        virial_key=cfg.virial_key if cfg.virial else None,
        length_unit=cfg.length_unit,
    )


def scan(path: str, key: str, labels: mtt.Labels) -> set[int]:
    """Check a structure file has the configured labels; return its atomic numbers."""
    if not Path(path).is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    return set(_scan(file_identity(path), key, labels))


@functools.lru_cache(maxsize=16)  # a sweep's trials read the same files: once per process
def _scan(identity: tuple[str, int, int], key: str, labels: mtt.Labels) -> frozenset[int]:
    path = identity[0]
    group = key.rsplit(".", 1)[0]  # data.finetune / data.original: where the label keys live
    species: set[int] = set()
    count = 0
    try:
        for index, atoms in enumerate(iread(path, index=":")):
            where = f"{key}: {path} structure {index}"
            check_labels(atoms, labels, where, group)
            species.update(int(z) for z in atoms.numbers)
            count += 1
    except ConfigError:
        raise
    except Exception as error:  # ASE raises many kinds for a malformed file
        message = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"{key}: cannot read {path} with ASE: {type(error).__name__}: {message}") from None
    if count == 0:
        raise ConfigError(f"{key}: {path} holds no structures")
    return frozenset(species)


def check_labels(atoms: Any, labels: mtt.Labels, where: str, group: str) -> None:
    """ConfigError naming `where` when a structure lacks a configured label or has a non-finite one."""
    info, arrays = labels_of_structure(atoms)
    wanted = [("energy", labels.energy_key, info, f"{group}.energy_key")]
    if labels.forces_key is not None:
        wanted.append(("forces", labels.forces_key, arrays, f"{group}.forces_key, or forces=false"))
    if labels.stress_key is not None:
        wanted.append(("stress", labels.stress_key, info, f"{group}.stress_key, or stress=false"))
    if labels.virial_key is not None:
        wanted.append(("virial", labels.virial_key, info, f"{group}.virial_key, or virial=false"))
    for what, name, source, setting in wanted:
        if name not in source:
            raise ConfigError(f"{where} has no {what} under key {name!r} (set {setting})")
        if not np.all(np.isfinite(np.asarray(source[name], dtype=float))):
            raise ConfigError(f"{where}: its {what} ({name!r}) is NaN or infinite")
    if labels.stress_key is not None and not atoms.cell.volume > 0:
        raise ConfigError(f"{where} has no cell: stress needs a periodic structure (or {group}.stress=false)")


def labels_of_structure(atoms: Any) -> tuple[dict, dict]:
    """info/arrays plus what ASE moved into a calculator (extxyz `energy`, `forces`, `stress`)."""
    info, arrays = dict(atoms.info), dict(atoms.arrays)
    if atoms.calc is not None:
        for name, value in atoms.calc.results.items():
            (arrays if name == "forces" else info).setdefault(name, value)
    return info, arrays


@functools.lru_cache(maxsize=16)
def _read(identity: tuple[str, int, int], labels: mtt.Labels) -> tuple[mtt.Dataset, dict]:
    return mtt.read_dataset(identity[0], labels)


def read(path: str | Path, labels: mtt.Labels) -> tuple[mtt.Dataset, dict]:
    """metatrain's reading of a file, once per process (datasets are never modified)."""
    return _read(file_identity(path), labels)


def original_file(original: Any) -> tuple[Path, list[int] | None]:
    """The file to parse for the original set, and which structures of it that is.

    With `max_structures`, an extended XYZ file is cut down before anything parses it;
    None: every structure of the file (or, for another format, chosen after parsing).
    """
    path = Path(original.path)
    if original.max_structures is None:
        return path, None
    subset = subsample.subset_file(path, original.max_structures, original.subsample_seed)
    return subset if subset is not None else (path, None)


def check(cfg: Config) -> dict[str, set[int]]:
    """Scan every configured file; returns the species per role."""
    finetune, original = cfg.data.finetune, cfg.data.original
    files = {"train": finetune.train, "validation": finetune.validation, "test": finetune.test}
    embedded.ensure_used([*files.values(), original.path])
    _check_units(finetune, "data.finetune")
    species = {
        role: scan(path, f"data.finetune.{role}", labels_of(finetune))
        for role, path in files.items()
        if path is not None
    }
    if original.path is not None:
        _check_units(original, "data.original")
        if not Path(original.path).is_file():
            raise ConfigError(f"data.original.path: file not found: {original.path}")
        try:
            path, _ = original_file(original)
        except ValueError as error:  # a broken frame found while indexing the file
            raise ConfigError(f"data.original.path: {error}") from None
        species["original"] = scan(str(path), "data.original.path", labels_of(original))
    return species


def _check_units(group: Any, key: str) -> None:
    for name, to in (("energy_unit", mtt.units.ENERGY), ("length_unit", "A")):
        try:
            mtt.units.factor(str(group[name]), to)
        except ValueError as error:
            raise ConfigError(f"{key}.{name}: {error}") from None


def load(cfg: Config) -> Datasets:
    finetune, original = cfg.data.finetune, cfg.data.original
    labels = labels_of(finetune)
    train, target_info = read(finetune.train, labels)
    sha = {"train": file_sha256(finetune.train)}
    if finetune.validation is not None:
        validation, _ = read(finetune.validation, labels)
        sha["validation"] = file_sha256(finetune.validation)
    else:
        train, validation = _split(train, finetune.validation_fraction, cfg.seed)
    test = None
    if finetune.test is not None:
        test, _ = read(finetune.test, labels)
        sha["test"] = file_sha256(finetune.test)
    original_set, indices, all_labels = None, None, {"finetune": labels}
    if original.path is not None:
        all_labels["original"] = labels_of(original)
        path, indices = original_file(original)
        original_set, _ = read(path, all_labels["original"])
        if indices is None and original.max_structures is not None:  # not extended XYZ
            indices = subsample.choose(len(original_set), original.max_structures, original.subsample_seed)
            original_set = torch.utils.data.Subset(original_set, indices)
        sha["original"] = file_sha256(original.path)
    return Datasets(
        train=train,
        validation=validation,
        test=test,
        original=original_set,
        target_info=target_info,
        atomic_types=mtt.atomic_types([train, validation]),
        labels=all_labels,
        sha256=sha,
        original_indices=indices,
    )


def _split(dataset: mtt.Dataset, fraction: float, seed: int) -> tuple[mtt.Dataset, mtt.Dataset]:
    order = subsample.permutation(len(dataset), seed)
    count = max(1, round(fraction * len(dataset)))
    if count >= len(dataset):
        raise ConfigError(
            f"data.finetune.validation_fraction {fraction} leaves no training structures "
            f"out of {len(dataset)}"
        )
    return torch.utils.data.Subset(dataset, sorted(order[count:])), torch.utils.data.Subset(
        dataset, sorted(order[:count])
    )


def validation_set(cfg: Config) -> tuple[mtt.Dataset, mtt.Labels, str, str]:
    """The fine-tuning validation set a trial evaluated on, from its config.

    Returns (dataset, its labels, the role of the file it comes from, that file's
    sha256): a validation file, or the training file when validation was split off it.
    """
    finetune = cfg.data.finetune
    labels = labels_of(finetune)
    role = "validation" if finetune.validation is not None else "train"
    path = finetune[role]
    embedded.ensure_used([path])  # the embedded files are remade, bit for bit, where missing
    scan(path, f"data.finetune.{role}", labels)
    dataset, _ = read(path, labels)
    if role == "train":
        dataset = _split(dataset, finetune.validation_fraction, cfg.seed)[1]
    return dataset, labels, role, file_sha256(path)
