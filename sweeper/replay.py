"""Replay: structures of the original set trained on with the fine-tuning data, to forget less.

`finetune.replay.structures` structures of the original file join every training epoch
through metatrain's own multi-dataset training (a second training set, `repeat` times),
as metatrain's docs and MACE's multihead fine-tuning recommend. They are the next ones
of the same fixed-seed permutation whose first `data.original.max_structures` measure
retained accuracy, so the two sets never overlap. With `finetune.replay.pool`, that many
are taken instead and each epoch trains on `structures` of them drawn afresh (seeded):
metatrain's combined loader visits every batch of every training set each epoch, so the
per-epoch cost follows `structures x repeat`, while the pool sets how much of the original
set is seen over the run.

Labels: `reference` takes the file's own labels; `base` labels the structures with the
base model's own predictions (MACE's pseudolabel replay, for users who have the
structures of the original set but not its labels), computed once per checkpoint, data
and subsample and cached. Either way the replay set carries exactly the label kinds the
fine-tuning data has (a force term only when it has forces), in the base model's units,
and with `energy_reference=refit` its energies move to the new reference (the per-element
offsets added), or the two training sets would disagree by exactly those offsets.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.io import read, write
from ase.stress import voigt_6_to_full_3x3_stress
from omegaconf import read_write

from sweeper import data, embedded, subsample
from sweeper import metatrain as mtt
from sweeper.config import Config, ConfigError, ReplayLabels, replay_batch
from sweeper.files import cached, file_sha256, written_atomically

FORMAT = 1  # bump when the cached replay files would differ
# By default each epoch replays AUTO structures, in batches of `finetune.replay.batch_size` (2),
# drawn afresh from a pool of up to AUTO_POOL: like 32 fixed ones it forgets nothing, at 3/4 of
# their time and a slightly worse fit (docs/forgetting.md, "The defaults, measured")
AUTO, AUTO_POOL = 16, 32
# Neutral keys: ASE and metatrain give `energy`, `forces` and `stress` special meanings.
ENERGY, FORCES, STRESS, VIRIAL = "replay_energy", "replay_forces", "replay_stress", "replay_virial"

log = logging.getLogger(__name__)


class EpochDraw(torch.utils.data.Dataset):
    """`size` structures of `pool`, drawn afresh for each epoch from a seeded stream of their own
    (the trial's torch random stream is not touched, so the rest of the run is unchanged)."""

    def __init__(self, pool: mtt.Dataset, size: int, seed: tuple[int, ...]) -> None:
        self.pool, self.size, self.seed = pool, size, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([*self.seed, epoch])
        self.chosen = rng.choice(len(self.pool), self.size, replace=False).tolist()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        return self.pool[self.chosen[index]]


@dataclass
class Replay:
    dataset: mtt.Dataset  # every structure that may be replayed: the pool, or the fixed set
    labels: mtt.Labels
    indices: list[int]  # of the original file
    repeat: int
    per_epoch: int  # structures of each draw
    seed: int

    def __post_init__(self) -> None:
        drawn = self.per_epoch < len(self.indices)  # a pool larger than one draw
        self.draws = (
            [EpochDraw(self.dataset, self.per_epoch, (self.seed, c)) for c in range(self.repeat)]
            if drawn
            else []
        )

    def training_sets(self) -> list[mtt.Dataset]:
        return list(self.draws) if self.draws else [self.dataset] * self.repeat

    def set_epoch(self, epoch: int) -> None:
        """Draw the structures the coming `epoch` replays (a no-op without a pool)."""
        for draw in self.draws:
            draw.set_epoch(epoch)


def wanted(cfg: Config) -> bool:
    return cfg.finetune.replay.structures > 0


def resolved(cfg: Config) -> Config:
    """`finetune.replay.structures: null` (the default) made a number: AUTO structures each epoch,
    drawn from a pool of up to AUTO_POOL of the original structures that retained accuracy leaves
    (or from `finetune.replay.pool`, if set); fewer where the file leaves fewer, none without room
    for one replayed batch or without an original set. Other values are returned as they are."""
    if cfg.finetune.replay.structures is not None:
        return cfg
    structures, pool = _auto(cfg)
    cfg = copy.deepcopy(cfg)
    with read_write(cfg):
        cfg.finetune.replay.structures = structures
        if pool is not None:
            cfg.finetune.replay.pool = pool
    return cfg


def _auto(cfg: Config) -> tuple[int, int | None]:
    """(structures per epoch, the pool they are drawn from: None to leave `pool` as it is)."""
    original, replay = cfg.data.original, cfg.finetune.replay
    path, retained = original.path, original.max_structures
    embedded.ensure_used([path])  # on a new machine the embedded original set is made here, first
    if path is None or retained is None or not Path(path).is_file():  # a missing file: data.check says it
        return 0, None
    if (problem := _label_problem(cfg)) is not None:  # asked for, it would be this error
        log.warning("no replay by default: %s", problem)
        return 0, None
    if replay.pool is not None:
        room = replay.pool
    else:
        try:
            room = min(AUTO_POOL, subsample.count(path) - retained)
        except Exception:  # an unreadable file: data.check names it in one line, next
            return 0, None
    if room < replay_batch(cfg)[0]:
        return 0, None
    structures = min(AUTO, room)
    if replay.pool is None and room < AUTO_POOL:  # measured: 16 of 32 keep the old accuracy
        log.warning(
            "less replay by default: %s leaves %d structures beside the %d that measure retained "
            "accuracy (data.original.max_structures); %d of a pool of %d were measured to keep it",
            path, room, retained, AUTO, AUTO_POOL,
        )  # fmt: skip
    return structures, (room if room > structures else None)


def _label_problem(cfg: Config) -> str | None:
    """Why the original file's own labels cannot train beside the fine-tuning data, if they cannot."""
    original, finetune = cfg.data.original, cfg.data.finetune
    if ReplayLabels(cfg.finetune.replay.labels) != ReplayLabels.reference:
        return None
    needs = {"forces": finetune.forces, "stress or virial": finetune.stress or finetune.virial}
    has = {"forces": original.forces, "stress or virial": original.stress or original.virial}
    for kind, needed in needs.items():
        if needed and not has[kind]:
            return (
                f"finetune.replay.labels=reference: the fine-tuning data has {kind}, data.original has "
                f"none configured (configure them, or finetune.replay.labels=base)"
            )
    if original.energy_unit != finetune.energy_unit:
        return (
            f"finetune.replay.labels=reference: data.original.energy_unit {original.energy_unit!r} "
            f"must be the fine-tuning data's {finetune.energy_unit!r} (the base model's) to train on"
        )
    return None


def _count(replay: Any) -> int:
    """Structures taken from the original file: the pool, else the fixed replay set."""
    return replay.pool if replay.pool is not None else replay.structures


def check(cfg: Config) -> tuple[set[int], list[int]]:
    """What replay needs, checked before anything trains; returns the replay structures'
    species and their indices in the original file.

    One-line errors: no room for both disjoint sets in the file, reference labels the
    fine-tuning data has and the original set lacks (or a replay structure without them),
    another energy unit than the base's.
    """
    replay, original = cfg.finetune.replay, cfg.data.original
    if original.max_structures is None:
        raise ConfigError(
            "finetune.replay.structures: set data.original.max_structures, the structures that measure "
            "retained accuracy (replay draws others, disjoint from them)"
        )
    reference = ReplayLabels(replay.labels) == ReplayLabels.reference
    if (problem := _label_problem(cfg)) is not None:
        raise ConfigError(problem)
    try:
        structures, indices = _structures(cfg)
    except subsample.TooFewStructures as error:
        free = max(0, error.count - original.max_structures)
        raise ConfigError(
            f"{'finetune.replay.pool' if replay.pool is not None else 'finetune.replay.structures'}: "
            f"{original.path} holds {error.count} structures, "
            f"{original.max_structures} measure retained accuracy (data.original.max_structures) and "
            f"{_count(replay)} were asked for replay, disjoint from them: at most {free}"
        ) from None
    species: set[int] = set()
    labels = data.labels_of(original)
    for index, atoms in zip(indices, structures(), strict=True):
        if reference:
            data.check_labels(
                atoms, labels, f"data.original.path: {original.path} structure {index}", "data.original"
            )
        species.update(int(z) for z in atoms.numbers)
    return species, indices


def load(cfg: Config, checkpoint: str, offsets: dict[int, float], device: torch.device) -> Replay:
    """The replay training set: labelled, in the fine-tuning data's reference, cached."""
    replay, finetune = cfg.finetune.replay, cfg.data.finetune
    structures, indices = _structures(cfg)
    forces, strain = finetune.forces, finetune.stress or finetune.virial
    by_base = ReplayLabels(replay.labels) == ReplayLabels.base
    key = {
        "format": FORMAT,
        "data_sha256": file_sha256(cfg.data.original.path),
        "indices": indices,
        "labels": str(ReplayLabels(replay.labels).value),
        "forces": bool(forces),
        "strain": bool(strain),
        "offsets": {str(z): value for z, value in sorted(offsets.items())},
        "metatrain": mtt.METATRAIN_VERSION,
    }
    if by_base:  # the numbers depend on the model and where it ran
        key |= {"checkpoint_sha256": file_sha256(checkpoint), "device": device.type}
    else:
        key |= {
            "keys": [
                cfg.data.original[name] for name in ("energy_key", "forces_key", "stress_key", "virial_key")
            ]
        }
    path = cached("replay", key, ".xyz")
    if not path.is_file():
        if by_base:
            frames = _labelled_by_base(structures(), checkpoint, device, forces, strain)
        else:
            frames = [_labelled(atoms, cfg.data.original, forces, strain) for atoms in structures()]
        with written_atomically(path) as tmp:
            write(tmp, _shifted(frames, offsets), format="extxyz")
    labels = mtt.Labels(
        energy_key=ENERGY,
        energy_unit=finetune.energy_unit,
        forces_key=FORCES if forces else None,
        stress_key=STRESS if strain and not by_base and cfg.data.original.stress else None,
        virial_key=VIRIAL if strain and (by_base or not cfg.data.original.stress) else None,
        length_unit=finetune.length_unit,
    )
    dataset, _ = data.read(path, labels)
    return Replay(dataset, labels, indices, replay.repeat, replay.structures, cfg.seed)


def _structures(cfg: Config) -> tuple[Any, list[int]]:
    """(a function giving the replay structures as ASE Atoms, their indices in the file)."""
    original, replay = cfg.data.original, cfg.finetune.replay
    path, after = original.path, original.max_structures
    count = _count(replay)
    subset = subsample.subset_file(path, count, original.subsample_seed, after=after)
    if subset is not None:
        return (lambda: read(subset[0], ":")), subset[1]
    frames = read(path, ":")  # not extended XYZ: parsed whole
    subsample.check_room(path, len(frames), count, after)
    indices = subsample.choose(len(frames), count, original.subsample_seed, after)
    return (lambda: [frames[i] for i in indices]), indices


def _labelled(atoms: Atoms, original: Any, forces: bool, strain: bool) -> Atoms:
    """The structure with its own labels under the replay keys (the kinds the fine-tuning data has)."""
    info, arrays = data.labels_of_structure(atoms)
    plain = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    plain.info[ENERGY] = float(info[original.energy_key])
    if forces:
        plain.arrays[FORCES] = np.asarray(arrays[original.forces_key], dtype=float)
    if strain and original.stress:
        plain.info[STRESS] = _full(info[original.stress_key])
    elif strain:
        plain.info[VIRIAL] = _full(info[original.virial_key])
    return plain


def _labelled_by_base(
    structures: list[Atoms], checkpoint: str, device: torch.device, forces: bool, strain: bool
) -> list[Atoms]:
    # Loading a model draws its initial weights: the trial's random stream must not depend on
    # whether these labels came from the cache.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        predicted = mtt.label(mtt.load_checkpoint(checkpoint), structures, device, forces, strain)
    frames = []
    for atoms, labels in zip(structures, predicted, strict=True):
        plain = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        plain.info[ENERGY] = labels.energy
        if forces:
            plain.arrays[FORCES] = labels.forces.numpy()
        if strain:
            plain.info[VIRIAL] = labels.virial.numpy()
        frames.append(plain)
    return frames


def _full(value: Any) -> np.ndarray:
    """A 3x3 stress or virial from 3x3, 9 or Voigt-6 values (ASE stores stress as Voigt 6)."""
    value = np.asarray(value, dtype=float)
    return voigt_6_to_full_3x3_stress(value) if value.shape == (6,) else value.reshape(3, 3)


def _shifted(frames: list[Atoms], offsets: dict[int, float]) -> list[Atoms]:
    """Energies moved to the fine-tuning data's reference (energy_reference=refit)."""
    for atoms in frames:
        atoms.info[ENERGY] += sum(offsets.get(int(z), 0.0) for z in atoms.numbers)
    return frames
