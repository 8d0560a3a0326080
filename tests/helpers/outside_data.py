"""Data and base models that are not ours: what users bring.

Session fixtures (pytest plugin, loaded by conftest) that write structure files the way
other tools do and train base models with the real `mtt train` command:
- energy-only molecules with energies in hartree under a custom key, and a PET base
  trained on them in hartree;
- periodic copper with stress (and the same labels as a virial);
- a foundation-shaped base: three elements, energy + forces + stress and an extra
  `non_conservative_force` head, with fine-tuning data of the same alloys, plain and
  with energies shifted by per-element constants (another DFT reference).
Labels come from ASE's EMT, so everything is generated here, in seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import write

HARTREE_IN_EV = 27.211386245988  # CODATA 2018, typed here: an independent conversion
BOHR_IN_ANGSTROM = 0.529177210903  # CODATA 2018
SHIFTS_EV = {29: 0.8, 47: -0.35, 79: 1.3}  # per-element reference change (Cu, Ag, Au)
TINY_PET = {
    "cutoff": 4.5,
    "d_pet": 16,
    "d_head": 16,
    "d_node": 32,
    "d_feedforward": 32,
    "num_heads": 2,
    "num_attention_layers": 1,
    "num_gnn_layers": 1,
}


def _labelled(atoms: Atoms, stress: bool = False) -> tuple[float, np.ndarray, np.ndarray | None]:
    atoms.calc = EMT()
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    full = atoms.get_stress(voigt=False) if stress else None
    atoms.calc = None
    return energy, forces, full


# ---------------------------------------------------------------- molecules in hartree


def molecules(count: int, seed: int, names: tuple[str, ...]) -> list[Atoms]:
    """Rattled small molecules, energy only, in hartree under `dft_energy`; no cell."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        atoms = molecule(names[index % len(names)])
        atoms.rattle(stdev=rng.uniform(0.02, 0.08), seed=int(rng.integers(2**31)))
        energy, _, _ = _labelled(atoms)
        atoms.info["dft_energy"] = energy / HARTREE_IN_EV
        frames.append(atoms)
    return frames


def mtt_train(
    folder: Path,
    training_file: Path,
    target: dict,
    epochs: int,
    extra: dict | None = None,
    length_unit: str = "angstrom",
) -> Path:
    """A PET base trained by the real `mtt train` command; returns its checkpoint."""
    options = {
        "seed": 0,
        "architecture": {
            "name": "pet",
            "model": TINY_PET,
            "training": {
                "batch_size": 8,
                "num_epochs": epochs,
                "learning_rate": 3e-3,
                "num_workers": 0,
                "log_interval": 1,
            },
        },
        "training_set": {
            "systems": {"read_from": str(training_file), "length_unit": length_unit},
            "targets": {"energy": target, **(extra or {})},
        },
        "validation_set": 0.2,
        "test_set": 0.0,
    }
    (folder / "options.yaml").write_text(yaml.safe_dump(options))
    done = subprocess.run(
        [sys.executable, "-m", "metatrain", "train", "options.yaml", "-o", "base.pt"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "base.ckpt"


@pytest.fixture(scope="session")
def hartree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Energy-only molecules in hartree and a base trained on them in hartree by `mtt train`."""
    folder = tmp_path_factory.mktemp("hartree")
    seen = ("CH4", "H2O", "NH3", "C2H6", "CH3OH")
    files = {
        "original": (molecules(40, 1, seen), "original.xyz"),
        "train": (molecules(12, 2, ("CH3CH2OH", "CH3CHO", "HCOOH")), "train.xyz"),
        "validation": (molecules(6, 3, ("CH3CH2OH", "CH3CHO", "HCOOH")), "validation.xyz"),
    }
    paths = {}
    for role, (frames, name) in files.items():
        paths[role] = folder / name
        write(paths[role], frames, format="extxyz")
    target = {"key": "dft_energy", "unit": "hartree", "forces": False, "stress": False}
    paths["base"] = mtt_train(folder, paths["original"], target, epochs=3)
    return paths


def hartree_overrides(paths: dict[str, Path], workdir: Path) -> list[str]:
    """A user's command line for energy-only molecules in hartree."""
    labels = ["energy_key=dft_energy", "energy_unit=hartree", "forces=false"]
    return [
        f"model.checkpoint={paths['base']}",
        f"data.finetune.train={paths['train']}",
        f"data.finetune.validation={paths['validation']}",
        "data.finetune.test=null",
        *(f"data.finetune.{label}" for label in labels),
        f"data.original.path={paths['original']}",
        "data.original.max_structures=12",
        *(f"data.original.{label}" for label in labels),
        "train.epochs=2",
        "train.batch_size=4",
        "lora.rank=2",
        "threads=2",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


# ------------------------------------------------------------ periodic data with stress


def strained_copper(count: int, seed: int) -> list[Atoms]:
    """Rattled, strained fcc copper cells of 4 atoms with energy, forces, stress and virial."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        strain = np.eye(3) + rng.uniform(-0.03, 0.03, size=(3, 3))
        atoms.set_cell(atoms.cell @ ((strain + strain.T) / 2), scale_atoms=True)
        atoms.rattle(stdev=rng.uniform(0.02, 0.1), seed=int(rng.integers(2**31)))
        energy, forces, stress = _labelled(atoms, stress=True)
        atoms.info.update(energy=energy, stress=stress, virial=-stress * atoms.get_volume())
        atoms.arrays["forces"] = forces
        frames.append(atoms)
    return frames


@pytest.fixture(scope="session")
def stressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("stress")
    paths = {"train": folder / "train.xyz", "validation": folder / "validation.xyz"}
    write(paths["train"], strained_copper(10, 11), format="extxyz")
    write(paths["validation"], strained_copper(5, 12), format="extxyz")
    return paths


# --------------------------------------------------------- a foundation-shaped base


def alloys(count: int, seed: int, shifted: bool = False) -> list[Atoms]:
    """Rattled, strained fcc cells of 4 atoms of Cu, Ag and Au with EMT labels (eV);
    `shifted`: energies moved by SHIFTS_EV per atom of each element (another reference)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=3.85, cubic=True)
        atoms.numbers = rng.choice(list(SHIFTS_EV), size=len(atoms))
        strain = np.eye(3) + rng.uniform(-0.02, 0.02, size=(3, 3))
        atoms.set_cell(atoms.cell @ ((strain + strain.T) / 2), scale_atoms=True)
        atoms.rattle(stdev=rng.uniform(0.02, 0.1), seed=int(rng.integers(2**31)))
        energy, forces, stress = _labelled(atoms, stress=True)
        if shifted:
            energy += sum(SHIFTS_EV[int(z)] for z in atoms.numbers)
        atoms.info.update(energy=energy, stress=stress)
        atoms.arrays["forces"] = forces
        frames.append(atoms)
    return frames


@pytest.fixture(scope="session")
def foundation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A multi-element base with an extra non-conservative force head, trained by `mtt train`,
    and fine-tuning data of the same alloys (plain and with another energy reference)."""
    folder = tmp_path_factory.mktemp("foundation")
    paths = {name: folder / f"{name}.xyz" for name in ("original", "train", "validation")}
    write(paths["original"], alloys(48, 21), format="extxyz")
    write(paths["train"], alloys(12, 22), format="extxyz")
    write(paths["validation"], alloys(6, 23), format="extxyz")
    for role in ("train", "validation"):
        paths[f"shifted_{role}"] = folder / f"shifted_{role}.xyz"
        write(
            paths[f"shifted_{role}"],
            alloys(12 if role == "train" else 6, 22 if role == "train" else 23, shifted=True),
            format="extxyz",
        )
    target = {"key": "energy", "unit": "eV", "forces": {"key": "forces"}, "stress": {"key": "stress"}}
    head = {
        "non_conservative_force": {
            "key": "forces",
            "quantity": "force",
            "unit": "eV/A",
            "type": {"cartesian": {"rank": 1}},
            "per_atom": True,
        }
    }
    paths["base"] = mtt_train(folder, paths["original"], target, epochs=3, extra=head)
    return paths


def in_atomic_units(frames: list[Atoms]) -> list[Atoms]:
    """The same structures and labels in hartree and bohr, as many DFT codes write them."""
    converted = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.set_cell(atoms.cell / BOHR_IN_ANGSTROM, scale_atoms=True)
        atoms.info["energy"] = atoms.info["energy"] / HARTREE_IN_EV
        atoms.info["stress"] = atoms.info["stress"] / HARTREE_IN_EV * BOHR_IN_ANGSTROM**3
        atoms.arrays["forces"] = atoms.arrays["forces"] / HARTREE_IN_EV * BOHR_IN_ANGSTROM
        converted.append(atoms)
    return converted


@pytest.fixture(scope="session")
def atomic_units(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Alloys in hartree and bohr, with forces and stress, and a base trained on them so."""
    folder = tmp_path_factory.mktemp("atomic-units")
    paths = {name: folder / f"{name}.xyz" for name in ("original", "train", "validation")}
    for path, (count, seed) in zip(paths.values(), ((32, 31), (8, 32), (5, 33)), strict=True):
        write(path, in_atomic_units(alloys(count, seed)), format="extxyz")
    target = {"key": "energy", "unit": "hartree", "forces": {"key": "forces"}, "stress": {"key": "stress"}}
    training = folder / "training"
    training.mkdir()
    paths["base"] = mtt_train(training, paths["original"], target, epochs=3, length_unit="bohr")
    return paths


def foundation_overrides(paths: dict[str, Path], workdir: Path, shifted: bool = False) -> list[str]:
    prefix = "shifted_" if shifted else ""
    return [
        f"model.checkpoint={paths['base']}",
        f"data.finetune.train={paths[prefix + 'train']}",
        f"data.finetune.validation={paths[prefix + 'validation']}",
        "data.finetune.test=null",
        "data.finetune.stress=true",
        f"data.original.path={paths['original']}",
        "data.original.max_structures=16",
        "data.original.stress=true",
        "train.epochs=2",
        "train.batch_size=4",
        "lora.rank=2",
        "threads=2",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
    ]
