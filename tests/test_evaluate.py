"""Error arithmetic, retained accuracy and the base-error cache."""

from __future__ import annotations

import math

import pytest
import torch

from sweeper import evaluate
from sweeper import metatrain as mtt


def test_mae_and_rmse_in_meV() -> None:
    errors = evaluate._mae_rmse(
        torch.tensor([0.003, -0.004], dtype=torch.float64), "force", "meV_per_A", 1000.0
    )
    assert errors["force_mae_meV_per_A"] == pytest.approx(3.5)
    assert errors["force_rmse_meV_per_A"] == pytest.approx(math.sqrt((9 + 16) / 2))


def test_retained_gives_absolute_difference_and_ratio() -> None:
    trial = {"force_mae_meV_per_A": 60.0, "energy_mae_meV_per_atom": 2.0}
    base = {"force_mae_meV_per_A": 40.0, "energy_mae_meV_per_atom": 2.0}
    retained = evaluate.retained(trial, base)
    assert retained["retained_force_mae_meV_per_A"] == 60.0
    assert retained["base_force_mae_meV_per_A"] == 40.0
    assert retained["retained_force_mae_increase_meV_per_A"] == 20.0
    assert retained["retained_force_mae_ratio"] == 1.5
    assert retained["retained_energy_mae_ratio"] == 1.0


def test_errors_match_a_direct_computation(tiny_data) -> None:
    """Our batched metric equals one computed structure by structure."""
    from sweeper import embedded

    model = mtt.load_checkpoint(embedded.base_model_path())
    dataset, _ = mtt.read_dataset(tiny_data["validation"], mtt.Labels())
    batched = evaluate.errors(model, dataset, mtt.Labels(), torch.device("cpu"), batch_size=3)
    energy, force = [], []
    for batch in mtt.predict(model, dataset, torch.device("cpu"), 1):
        (predicted_e, reference_e), (predicted_g, reference_g) = batch.energy, batch.gradient
        energy.append(float((predicted_e - reference_e).abs().sum() / batch.atoms.sum()))
        force.append((predicted_g - reference_g).abs().reshape(-1))
    assert batched["energy_mae_meV_per_atom"] == pytest.approx(1000 * sum(energy) / len(energy), rel=1e-5)
    assert batched["force_mae_meV_per_A"] == pytest.approx(1000 * float(torch.cat(force).mean()), rel=1e-5)


def test_base_errors_are_computed_once_per_key(tiny_data) -> None:
    from sweeper import embedded

    labels, cpu = mtt.Labels(), torch.device("cpu")
    dataset, _ = mtt.read_dataset(tiny_data["original"], labels)
    key = {"checkpoint": "test", "data": str(tiny_data["original"])}
    first, cached_first = evaluate.base_errors(embedded.base_model_path(), dataset, labels, cpu, key)
    second, cached_second = evaluate.base_errors(embedded.base_model_path(), dataset, labels, cpu, key)
    assert (cached_first, cached_second) == (False, True)
    assert first == second
    _, other = evaluate.base_errors(embedded.base_model_path(), dataset, labels, cpu, {**key, "data": "x"})
    assert other is False
