"""Reading structures and labels with metatrain's own reader (any ASE-readable file)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import metatrain.utils.data.readers.readers as metatrain_readers
from metatrain.utils.data import DatasetInfo, get_atomic_types, get_dataset
from metatrain.utils.data.target_info import get_energy_target_info
from metatrain.utils.omegaconf import expand_dataset_config
from omegaconf import OmegaConf

ENERGY_TARGET = "energy"

Dataset = Any  # metatrain.utils.data.Dataset or a torch Subset of one


@dataclass(frozen=True)
class Labels:
    """How energies, forces and stress (or virial) are stored in an ASE-readable file."""

    energy_key: str = "energy"
    energy_unit: str = "eV"
    forces_key: str | None = "forces"  # None: energies only
    stress_key: str | None = None  # stress (energy/length^3), or
    virial_key: str | None = None  # virial (energy); never both
    length_unit: str = "angstrom"

    def target(self, path: str | Path) -> dict[str, Any]:
        """metatrain's `targets.energy` section for a file holding these labels."""

        def gradient(key: str | None) -> Any:
            return {"read_from": str(path), "reader": "ase", "key": key} if key else False

        return {
            "reader": "ase",  # any file ASE reads, whatever its extension (metatrain knows .xyz)
            "key": self.energy_key,
            "unit": self.energy_unit,
            "forces": gradient(self.forces_key),
            "stress": gradient(self.stress_key),
            "virial": gradient(self.virial_key),
        }


def read_dataset(path: str | Path, labels: Labels) -> tuple[Dataset, dict]:
    """The structures of `path` with their labels, as metatrain reads them."""
    conf = {
        "systems": {"read_from": str(path), "reader": "ase", "length_unit": labels.length_unit},
        "targets": {ENERGY_TARGET: labels.target(path)},
    }
    options = expand_dataset_config(OmegaConf.create(conf))[0]
    with _no_unitless_target_check(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found 9-long numerical vector")  # row major: fine
        dataset, target_info, _ = get_dataset(options)
    return dataset, target_info


@contextlib.contextmanager
def _no_unitless_target_check() -> Iterator[None]:
    """metatrain checks a target's name by building a unit-less ModelOutput, which makes
    metatomic's C++ print a warning on stderr at every read; ours is always `energy`."""
    original = getattr(metatrain_readers, "_validate_target", None)
    if original is not None:
        metatrain_readers._validate_target = lambda key, entry: None
    try:
        yield
    finally:
        if original is not None:
            metatrain_readers._validate_target = original


def energy_target_info(unit: str, forces: bool, strain: bool) -> Any:
    """A fresh `TargetInfo` for the energy with the given gradients (its `gradients`
    property has no setter: a target's gradients are fixed when it is made)."""
    return get_energy_target_info(ENERGY_TARGET, {"unit": unit}, forces, strain)


def atomic_types(datasets: list[Dataset]) -> list[int]:
    return [int(z) for z in get_atomic_types(datasets)]


def dataset_info(atomic_types: list[int], target_info: dict, length_unit: str) -> DatasetInfo:
    return DatasetInfo(length_unit=length_unit, atomic_types=atomic_types, targets=target_info)
