"""Errors of a model on a dataset, in meV whatever the units, and retained accuracy.

Predictions come in the model's units and labels in the data's: the predictions are
brought to the data's units (a factor of exactly 1 when they agree), the errors are
taken there in float64, then converted to meV/atom, meV/Å and meV/Å³ with metatomic's
factors. Stress errors are per component of the 3x3 stress (a virial label counts as
its stress, -virial / volume).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from sweeper import metatrain as mtt
from sweeper import objective
from sweeper.files import cached, written_atomically

if TYPE_CHECKING:
    from sweeper.config import Config
    from sweeper.data import Datasets

# Part of the base-error cache key: bump when `errors` would give other numbers.
EVALUATION_VERSION = 3


def errors(
    model: mtt.PET, dataset: mtt.Dataset, labels: mtt.Labels, device: torch.device, batch_size: int = 16
) -> dict[str, float]:
    """Energy MAE/RMSE per atom (meV/atom), force MAE/RMSE (meV/Å) and stress MAE/RMSE
    (meV/Å³) where the data has those labels."""
    to_data = mtt.units.factor(mtt.model_units(model)[0], labels.energy_unit)
    energy, force, stress = [], [], []
    for batch in mtt.predict(model, dataset, device, batch_size):
        predicted, reference = batch.energy
        energy.append((predicted * to_data - reference) / batch.atoms)
        if batch.gradient is not None:
            predicted, reference = batch.gradient
            force.append((predicted * to_data - reference).reshape(-1))
        if batch.strain is not None:
            predicted, reference = batch.strain
            difference = predicted * to_data - reference
            stress.append((difference / batch.volumes.reshape(-1, 1, 1)).reshape(-1))
    e, length = labels.energy_unit, labels.length_unit
    result = _mae_rmse(torch.cat(energy), "energy", "meV_per_atom", mtt.units.factor(e, mtt.units.ENERGY))
    if force:
        to_mev = mtt.units.factor(mtt.units.force_unit(e, length), mtt.units.FORCE)
        result |= _mae_rmse(torch.cat(force), "force", "meV_per_A", to_mev)
    if stress:
        to_mev = mtt.units.factor(mtt.units.stress_unit(e, length), mtt.units.STRESS)
        result |= _mae_rmse(torch.cat(stress), "stress", "meV_per_A3", to_mev)
    return result


def _mae_rmse(error: torch.Tensor, quantity: str, unit: str, to_mev: float) -> dict[str, float]:
    return {
        f"{quantity}_mae_{unit}": float(error.abs().mean()) * to_mev,
        f"{quantity}_rmse_{unit}": float(error.pow(2).mean().sqrt()) * to_mev,
    }


def retained(trial: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Trial errors on the original set next to the base's: absolute, difference, ratio."""
    result: dict[str, float] = {}
    for name, value in trial.items():
        result[f"retained_{name}"] = value
        result[f"base_{name}"] = base[name]
        result[f"retained_{objective.increase(name)}"] = value - base[name]
        result[f"retained_{objective.ratio(name)}"] = value / base[name] if base[name] > 0 else math.inf
    return result


def base_errors(
    checkpoint: Path, dataset: mtt.Dataset, labels: mtt.Labels, device: torch.device, key: dict[str, object]
) -> tuple[dict[str, float], bool]:
    """The base model's errors on the original set, computed once per (checkpoint, data).

    `key` holds what the numbers depend on (checkpoint and data sha256, subsample,
    labels, device type); returns (errors, whether they came from the cache).
    """
    key = {**key, "evaluation_version": EVALUATION_VERSION}
    path = cached("base-errors", key, ".json")
    if path.is_file():
        return json.loads(path.read_text())["errors"], True
    result = errors(mtt.load_checkpoint(checkpoint), dataset, labels, device)
    with written_atomically(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "errors": result}, indent=2))
    return result, False


def trial_metrics(
    cfg: Config,
    model: mtt.PET,
    datasets: Datasets,
    device: torch.device,
    base_sha: str,
    offsets: dict[int, float],
) -> dict[str, float]:
    """The adapted model's errors: `val_`, `test_` and, with an original set, `retained_` next to
    the base's (`base_`, cached); retention is measured without the refit energy offsets."""
    labels = datasets.labels["finetune"]
    metrics = {f"val_{k}": v for k, v in errors(model, datasets.validation, labels, device).items()}
    if datasets.test is not None:
        metrics |= {f"test_{k}": v for k, v in errors(model, datasets.test, labels, device).items()}
    if datasets.original is not None:
        original = cfg.data.original
        labels = datasets.labels["original"]
        key = {
            "checkpoint_sha256": base_sha,
            "data_sha256": datasets.sha256["original"],
            "max_structures": original.max_structures,
            "subsample_seed": original.subsample_seed,
            "labels": OmegaConf.to_container(original, resolve=True),
            "device": device.type,
            "metatrain": mtt.METATRAIN_VERSION,
        }
        base, _ = base_errors(Path(cfg.model.checkpoint), datasets.original, labels, device, key)
        with mtt.energy_offsets_removed(model, offsets):  # a change of reference is not forgetting
            adapted = errors(model, datasets.original, labels, device)
        metrics |= retained(adapted, base)
    return metrics
