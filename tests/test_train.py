"""Early stopping, metric names and metatrain hypers (our own logic, no training)."""

from __future__ import annotations

import pytest
from helpers.sweeps import compose_config

from sweeper import metatrain as mtt
from sweeper import train


def _row(force_mae: float, energy_mae: float = 1.0) -> dict[str, float]:
    return {
        "val_force_mae_meV_per_A": force_mae,
        "val_energy_mae_meV_per_atom": energy_mae,
        "train_loss": 9.0,
    }


def test_early_stopping_after_patience_epochs_without_improvement() -> None:
    stop = train.EarlyStopping(patience=2)
    stop(0, _row(10.0))
    stop(1, _row(8.0))
    stop(2, _row(9.0))  # one epoch without improvement
    with pytest.raises(mtt.StopTraining) as raised:
        stop(3, _row(8.5))  # two
    assert raised.value.epoch == 3 and stop.best_epoch == 1


def test_early_stopping_uses_the_product_of_validation_maes() -> None:
    stop = train.EarlyStopping(patience=1)
    stop(0, _row(10.0, energy_mae=1.0))
    stop(1, _row(11.0, energy_mae=0.5))  # product 5.5 < 10: an improvement
    assert stop.best_epoch == 1


def test_no_patience_never_stops() -> None:
    stop = train.EarlyStopping(patience=None)
    for epoch in range(50):
        stop(epoch, _row(10.0 + epoch))


@pytest.mark.parametrize(
    ("key", "unit", "name"),
    [
        ("validation forces MAE", "meV/A", "val_force_mae_meV_per_A"),
        ("validation energy RMSE (per atom)", "meV", "val_energy_rmse_meV_per_atom"),
        ("training loss", "", "train_loss"),
        ("learning rate", "", "learning_rate"),
    ],
)
def test_metatrain_keys_become_metric_names_with_units(key: str, unit: str, name: str) -> None:
    assert mtt.metric_name(key, unit) == name


def test_hypers_carry_our_training_keys() -> None:
    cfg = compose_config(["train.lr=3e-4", "train.epochs=7", "train.batch_size=5", "train.weight_decay=0.01"])
    strategy = mtt.finetune_strategy("lora", cfg.model.checkpoint, 4, 8.0, ["input_linear"])
    hypers = train.hypers(cfg, strategy, [mtt.Labels()])
    assert (hypers["learning_rate"], hypers["num_epochs"], hypers["batch_size"]) == (3e-4, 7, 5)
    assert hypers["weight_decay"] == 0.01 and hypers["log_interval"] == 1
    assert hypers["finetune"]["config"] == {"rank": 4, "alpha": 8.0, "target_modules": ["input_linear"]}
    assert "positions" in hypers["loss"]["energy"]["gradients"]
