"""One fine-tuning run: metatrain hypers from our config, early stopping, per-epoch hook."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sweeper import config, objective
from sweeper import metatrain as mtt
from sweeper.config import EpochSelection

if TYPE_CHECKING:
    from sweeper.config import Config

EpochCallback = Callable[[int, dict[str, float]], None]


def hypers(
    cfg: Config, strategy: dict, labels: list[mtt.Labels], new_head: dict[int, float] | None = None
) -> dict:
    """Our `train.*` keys in metatrain's PET trainer vocabulary (one `labels` per training set).

    `new_head`: the composition of `finetune.replay.head=separate`'s new head (metatrain/heads.py),
    which the first training set trains; the others (replay) train `energy`.
    """
    train = cfg.train
    overrides = {
        "num_epochs": train.epochs,
        "batch_size": train.batch_size,
        "learning_rate": train.lr,
        "warmup_fraction": train.warmup_fraction,
        "weight_decay": train.weight_decay,
        "grad_clip_norm": train.grad_clip_norm,
        "loss": train.loss,
        "log_interval": 1,  # one row per epoch for MLflow and the pruners
        "checkpoint_interval": 10**9,  # epoch 0 still writes one: each trial has its own dir
        "num_workers": 0,  # no loader processes: deterministic and cheap for small sets
    }
    weights = mtt.LossWeights(
        **{name: float(train.loss_weights[name]) for name in ("energy", "forces", "stress")}
    )
    targets = None
    if new_head is not None:
        targets = [mtt.HEAD] + [mtt.ENERGY_TARGET] * (len(labels) - 1)
        overrides |= {
            "atomic_baseline": {mtt.HEAD: new_head},  # fixed: the base's, not refitted
            "scale_targets": False,  # the base's scales, copied (metatrain's scaler refuses `energy`)
        }
    return mtt.training_hypers(overrides, strategy, labels, weights, targets)


Score = Callable[[dict[str, float]], float]  # an epoch's row -> lower is better


def mae_product(row: dict[str, float]) -> float:
    """metatrain's own model-selection metric: the product of the validation MAEs."""
    return math.prod(value for name, value in row.items() if name.startswith("val_") and "_mae_" in name)


def epoch_score(cfg: Config) -> Score:
    """`train.select_epoch_by`: what picks the kept epoch and drives early stopping."""
    if EpochSelection(cfg.train.select_epoch_by) == EpochSelection.mae_prod:
        return mae_product
    metric = objective.goal(cfg).metric  # a validation metric: objective.goal checks it
    return lambda row: row[metric]


class EarlyStopping:
    """Stop when the epoch score has not improved for `patience` epochs.

    The score is the one that picks the kept epoch (`epoch_score`), read from the same
    per-epoch row, so the kept epoch and the stopping rule agree.
    """

    def __init__(self, patience: int | None, score: Score = mae_product) -> None:
        self.patience, self.score = patience, score
        self.best = float("inf")
        self.best_epoch = -1

    def __call__(self, epoch: int, row: dict[str, float]) -> None:
        metric = self.score(row)
        if metric < self.best:
            self.best, self.best_epoch = metric, epoch
        elif self.patience is not None and epoch - self.best_epoch >= self.patience:
            raise mtt.StopTraining(epoch, f"no improvement for {self.patience} epochs")


def fine_tune(
    model: mtt.PET,
    cfg: Config,
    strategy: dict,
    labels: list[mtt.Labels],
    train_sets: list[mtt.Dataset],
    val_sets: list[mtt.Dataset],
    device: torch.device,
    workdir: Path,
    on_epoch: EpochCallback,
    new_head: dict[int, float] | None = None,
) -> mtt.TrainResult:
    """Train `model` in place; returns the best-validation weights and where it stopped.
    `new_head`: see `hypers`."""
    score = epoch_score(cfg)
    stopper = EarlyStopping(cfg.train.early_stopping_patience, score)

    def each_epoch(epoch: int, row: dict[str, float]) -> None:
        on_epoch(epoch, row)
        stopper(epoch, row)

    schedule = (str(cfg.train.scheduler.value), cfg.train.step_size, cfg.train.gamma)
    return mtt.train(
        model,
        hypers(cfg, strategy, labels, new_head),
        train_sets,
        val_sets,
        device,
        workdir,
        each_epoch,
        schedule,
        penalty=anchor(cfg, model),
        select=None if score is mae_product else score,  # mae_prod: metatrain's own choice
        separate_head=new_head is not None,
        replay_batch_size=config.replay_batch(cfg)[0],
    )


def anchor(cfg: Config, model: mtt.PET) -> Callable[[], torch.Tensor] | None:
    """`finetune.anchor.weight` x the squared distance to the base (L2-SP), or None when off."""
    weight = float(cfg.finetune.anchor.weight)
    if weight == 0:
        return None
    distance = mtt.anchor_penalty(model)
    return lambda: weight * distance()
