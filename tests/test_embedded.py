"""The embedded default: deterministic data, and the shipped base model made from it."""

from __future__ import annotations

import json

import pytest

from sweeper import embedded, files
from sweeper import metatrain as mtt


def test_datasets_are_deterministic(embedded_paths, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PET_LORA_SWEEPER_CACHE", str(tmp_path))
    again = embedded.ensure_datasets()
    for role, path in embedded_paths.items():
        assert again[role] != path
        assert files.file_sha256(again[role]) == files.file_sha256(path), role


def test_shipped_base_model_was_trained_on_these_data(embedded_paths) -> None:
    card = embedded.base_model_card()
    assert card["training_data"]["sha256"] == files.file_sha256(embedded_paths["original"])
    assert card["checkpoint_sha256"] == files.file_sha256(embedded.base_model_path())
    assert card["metatrain_version"].split(".")[:2] == mtt.METATRAIN_VERSION.split(".")[:2]


@pytest.mark.slow
def test_shipped_base_model_reproduces_its_recorded_errors(embedded_paths) -> None:
    """Re-evaluated here, on data generated here: the numbers on the card, within 1e-6."""
    import torch

    from sweeper import evaluate

    dataset, _ = mtt.read_dataset(embedded_paths["original"], mtt.Labels())
    model = mtt.load_checkpoint(embedded.base_model_path())
    found = evaluate.errors(model, dataset, mtt.Labels(), torch.device("cpu"))
    assert found == pytest.approx(embedded.base_model_card()["errors_on_training_set"], rel=1e-6)


def test_base_model_is_meaningful_on_its_own_training_set() -> None:
    """Far better than predicting the mean: the errors the README reports."""
    errors = embedded.base_model_card()["errors_on_training_set"]
    assert errors["force_mae_meV_per_A"] < 0.25 * 562  # mean |F| of the set is 562 meV/Å
    assert errors["energy_mae_meV_per_atom"] < 0.5 * 54  # energy spread is 54 meV/atom


def test_default_config_points_at_the_embedded_files(embedded_paths) -> None:
    from helpers.sweeps import compose_config

    cfg = compose_config([])
    assert cfg.data.finetune.train == str(embedded_paths["train"])
    assert cfg.data.original.path == str(embedded_paths["original"])
    assert json.loads(embedded.base_model_path().with_suffix(".json").read_text())["parameters"] > 100_000


@pytest.mark.slow
def test_pretrain_recipe_writes_a_usable_checkpoint_and_card(embedded_paths, tmp_path) -> None:
    from sweeper import pretrain

    output = tmp_path / "base.ckpt"
    card = pretrain.pretrain(output, epochs=1, threads=2)
    assert card["checkpoint_sha256"] == files.file_sha256(output)
    assert card["training_data"]["sha256"] == files.file_sha256(embedded_paths["original"])
    assert output.stat().st_size < 5_000_000  # no optimizer state in a base model
    model = mtt.load_checkpoint(output)
    assert mtt.model_atomic_types(model) == [29] and mtt.model_targets(model) == ["energy"]
    assert set(card["errors_on_training_set"]) == {
        "energy_mae_meV_per_atom",
        "energy_rmse_meV_per_atom",
        "force_mae_meV_per_A",
        "force_rmse_meV_per_A",
    }
