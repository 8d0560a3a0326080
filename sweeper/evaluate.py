"""Errors of a model on a dataset, and retained accuracy against the base model."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from sweeper import pet
from sweeper.embedded import cache_root

MEV = 1000.0
# Part of the base-error cache key: bump when `errors` would give other numbers.
EVALUATION_VERSION = 2


def errors(
    model: pet.PET, dataset: pet.Dataset, device: torch.device, batch_size: int = 16
) -> dict[str, float]:
    """Energy MAE/RMSE per atom (meV/atom) and force MAE/RMSE (meV/Å), in float64."""
    energy_error, force_error = [], []
    for predicted_e, reference_e, predicted_g, reference_g, atoms in pet.predict(
        model, dataset, device, batch_size
    ):
        energy_error.append((predicted_e - reference_e) / atoms)
        if predicted_g is not None:
            force_error.append((predicted_g - reference_g).reshape(-1))
    result = _mae_rmse(torch.cat(energy_error), "energy", "meV_per_atom")
    if force_error:
        result |= _mae_rmse(torch.cat(force_error), "force", "meV_per_A")
    return result


def _mae_rmse(error: torch.Tensor, quantity: str, unit: str) -> dict[str, float]:
    return {
        f"{quantity}_mae_{unit}": float(error.abs().mean()) * MEV,
        f"{quantity}_rmse_{unit}": float(error.pow(2).mean().sqrt()) * MEV,
    }


def retained(trial: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Trial errors on the original set next to the base's: absolute, difference, ratio."""
    result: dict[str, float] = {}
    for name, value in trial.items():
        result[f"retained_{name}"] = value
        result[f"base_{name}"] = base[name]
        result[f"retained_{name.replace('_mae_', '_mae_increase_').replace('_rmse_', '_rmse_increase_')}"] = (
            value - base[name]
        )
        result[f"retained_{_unitless(name)}_ratio"] = value / base[name] if base[name] > 0 else math.inf
    return result


def _unitless(name: str) -> str:
    return name.split("_meV")[0]


def base_errors(
    checkpoint: Path, dataset: pet.Dataset, device: torch.device, key: dict[str, object]
) -> tuple[dict[str, float], bool]:
    """The base model's errors on the original set, computed once per (checkpoint, data).

    `key` holds what the numbers depend on (checkpoint and data sha256, subsample,
    labels, device type); returns (errors, whether they came from the cache).
    """
    key = {**key, "evaluation_version": EVALUATION_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    cached = cache_root() / "base-errors" / f"{digest}.json"
    if cached.is_file():
        return json.loads(cached.read_text())["errors"], True
    result = errors(pet.load_checkpoint(checkpoint), dataset, device)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{digest[:6]}.tmp")
    tmp.write_text(json.dumps({"key": key, "errors": result}, indent=2))
    tmp.replace(cached)  # atomic: parallel trials never read half a file
    return result, False
