"""`data.finetune.energy_reference=refit`: per-element offsets between two DFT references.

Energies from another DFT code, functional or pseudopotential set differ from the base
model's by a constant per element. LoRA (the composition weights frozen) would spend its
capacity learning those constants, so `refit` fits them first, by least squares of
(labels - base predictions) over the fine-tuning training set, and adds them to the
adapted model's composition weights. They are stored with the adapter and taken back
out when retained accuracy is measured: a change of reference is not forgetting.

Only for a change of reference method: on data from the base's own method, a
per-element fit swallows real physics of the new domain (on the embedded default, the
~200 meV/atom by which surfaces lie above bulk) and hides forgetting.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.data import chemical_symbols

from sweeper import metatrain as mtt


def fit(model: mtt.PET, dataset: mtt.Dataset, device: torch.device) -> dict[int, float]:
    """Per-element offsets (model energy units, per atom) that best explain labels - predictions."""
    residuals, counts = [], []
    for batch in mtt.predict(model, dataset, device):
        predicted, reference = batch.energy
        residuals.append((reference - predicted).numpy())
    types = sorted({int(z) for index in range(len(dataset)) for z in _types(dataset, index)})
    for index in range(len(dataset)):
        present = _types(dataset, index)
        counts.append([int((present == z).sum()) for z in types])
    solution, *_ = np.linalg.lstsq(np.asarray(counts, dtype=float), np.concatenate(residuals), rcond=None)
    return {z: float(value) for z, value in zip(types, solution, strict=True)}


def _types(dataset: mtt.Dataset, index: int) -> torch.Tensor:
    return dataset[index]._asdict()["system"].types


def as_metrics(offsets: dict[int, float], energy_unit: str) -> dict[str, float]:
    """`energy_offset_Cu_meV`: the offset per atom of each element, in meV."""
    to_mev = mtt.units.factor(energy_unit, mtt.units.ENERGY)
    return {f"energy_offset_{chemical_symbols[z]}_meV": value * to_mev for z, value in offsets.items()}
