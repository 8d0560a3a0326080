"""The trial's datasets: fine-tuning train/validation(/test) and the original set.

Every file is checked (exists, readable, has the configured labels) before anything is
trained, so a bad path or key is a one-line error naming the file and the key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ase.io import iread

from sweeper import embedded, pet
from sweeper.config import ConfigError
from sweeper.embedded import file_identity, file_sha256


@dataclass
class Datasets:
    train: pet.Dataset
    validation: pet.Dataset
    test: pet.Dataset | None
    original: pet.Dataset | None
    target_info: dict
    atomic_types: list[int]  # of the fine-tuning data
    sha256: dict[str, str] = field(default_factory=dict)  # role -> file hash


def labels_of(cfg: Any) -> pet.Labels:
    return pet.Labels(
        energy_key=cfg.energy_key,
        energy_unit=cfg.energy_unit,
        forces_key=cfg.forces_key if cfg.forces else None,
        length_unit=cfg.length_unit,
    )


def scan(path: str, key: str, labels: pet.Labels) -> set[int]:
    """Check a structure file has the configured labels; return its atomic numbers."""
    if not Path(path).is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    return set(_scan(file_identity(path), key, labels))


@functools.lru_cache(maxsize=16)  # a sweep's trials read the same files: once per process
def _scan(identity: tuple[str, int, int], key: str, labels: pet.Labels) -> frozenset[int]:
    path = identity[0]
    species: set[int] = set()
    count = 0
    try:
        for index, atoms in enumerate(iread(path, index=":")):
            info, arrays = _labels_of(atoms)
            if labels.energy_key not in info:
                raise ConfigError(
                    f"{key}: {path} structure {index} has no energy under key "
                    f"{labels.energy_key!r} (set {key.rsplit('.', 1)[0]}.energy_key)"
                )
            if labels.forces_key is not None and labels.forces_key not in arrays:
                raise ConfigError(
                    f"{key}: {path} structure {index} has no forces under key "
                    f"{labels.forces_key!r} (set {key.rsplit('.', 1)[0]}.forces_key, or forces=false)"
                )
            species.update(int(z) for z in atoms.numbers)
            count += 1
    except ConfigError:
        raise
    except Exception as error:  # ASE raises many kinds for a malformed file
        raise ConfigError(f"{key}: cannot read {path} with ASE: {type(error).__name__}: {error}") from None
    if count == 0:
        raise ConfigError(f"{key}: {path} holds no structures")
    return frozenset(species)


@functools.lru_cache(maxsize=16)
def _read(identity: tuple[str, int, int], labels: pet.Labels) -> tuple[pet.Dataset, dict]:
    return pet.read_dataset(identity[0], labels)


def read(path: str, labels: pet.Labels) -> tuple[pet.Dataset, dict]:
    """metatrain's reading of a file, once per process (datasets are never modified)."""
    return _read(file_identity(path), labels)


def _labels_of(atoms: Any) -> tuple[dict, dict]:
    """info/arrays plus what ASE moved into a calculator (extxyz `energy`, `forces`)."""
    info, arrays = dict(atoms.info), dict(atoms.arrays)
    if atoms.calc is not None:
        for name, value in atoms.calc.results.items():
            (arrays if name == "forces" else info).setdefault(name, value)
    return info, arrays


def check(cfg: Any) -> dict[str, set[int]]:
    """Scan every configured file; returns the species per role."""
    finetune, original = cfg.data.finetune, cfg.data.original
    files = {"train": finetune.train, "validation": finetune.validation, "test": finetune.test}
    embedded.ensure_used([*files.values(), original.path])
    species = {
        role: scan(path, f"data.finetune.{role}", labels_of(finetune))
        for role, path in files.items()
        if path is not None
    }
    if original.path is not None:
        species["original"] = scan(original.path, "data.original.path", labels_of(original))
    return species


def load(cfg: Any) -> Datasets:
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
    original_set = None
    if original.path is not None:
        original_set, _ = read(original.path, labels_of(original))
        original_set = _subsample(original_set, original.max_structures, original.subsample_seed)
        sha["original"] = file_sha256(original.path)
    return Datasets(
        train=train,
        validation=validation,
        test=test,
        original=original_set,
        target_info=target_info,
        atomic_types=pet.atomic_types([train, validation]),
        sha256=sha,
    )


def _split(dataset: pet.Dataset, fraction: float, seed: int) -> tuple[pet.Dataset, pet.Dataset]:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, round(fraction * len(dataset)))
    if count >= len(dataset):
        raise ConfigError(
            f"data.finetune.validation_fraction {fraction} leaves no training structures "
            f"out of {len(dataset)}"
        )
    return torch.utils.data.Subset(dataset, sorted(order[count:])), torch.utils.data.Subset(
        dataset, sorted(order[:count])
    )


def _subsample(dataset: pet.Dataset, limit: int | None, seed: int) -> pet.Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.Subset(dataset, sorted(order[:limit].tolist()))


def validation_set(cfg: Any) -> tuple[pet.Dataset, str, str]:
    """The fine-tuning validation set a trial evaluated on, from its config.

    Returns (dataset, the role of the file it comes from, that file's sha256): a
    validation file, or the training file when validation was split off it.
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
    return dataset, role, file_sha256(path)
