"""Training in-process with metatrain's PET trainer, and its per-epoch metrics in meV."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import metatrain.pet.trainer as pet_trainer
import numpy as np
import torch
from metatrain.pet import PET, Trainer
from metatrain.utils.architectures import check_architecture_options, get_default_hypers
from metatrain.utils.logging import ROOT_LOGGER
from metatrain.utils.omegaconf import expand_loss_config
from omegaconf import OmegaConf

from sweeper.metatrain import heads, units
from sweeper.metatrain.data import ENERGY_TARGET, Dataset, Labels


@dataclass(frozen=True)
class LossWeights:
    energy: float = 1.0
    forces: float = 1.0
    stress: float = 1.0  # stress or virial: metatrain's strain gradient


def training_hypers(
    overrides: dict,
    strategy: dict | None,
    labels: list[Labels],
    weights: LossWeights = LossWeights(),
    targets: list[str] | None = None,
) -> dict:
    """metatrain's fully expanded `architecture.training` section for PET.

    `labels`: one per training set, each labelling the target of `targets` (default: `energy`
    for all); the loss gets a force (stress) term when any set has forces (stress or virial),
    with `weights` on the energy and its gradients.
    """
    defaults = get_default_hypers("pet", base_precision=32)
    training = OmegaConf.merge(defaults["training"], overrides)
    if strategy is not None:
        training.finetune = strategy
    check_architecture_options(
        name="pet",
        options={
            "name": "pet",
            "model": defaults["model"],  # validated with the base model, not here
            "training": OmegaConf.to_container(training, resolve=True),
        },
    )
    targets = targets or [ENERGY_TARGET] * len(labels)
    training_sets = [
        {"targets": {target: label.target("unused")}} for target, label in zip(targets, labels, strict=True)
    ]
    options = OmegaConf.create({"architecture": {"training": training}, "training_set": training_sets})
    expanded = OmegaConf.to_container(expand_loss_config(options).architecture.training, resolve=True)
    for target in set(targets):
        loss = expanded["loss"][target]
        loss["weight"] = weights.energy
        for gradient, weight in (("positions", weights.forces), ("strain", weights.stress)):
            if gradient in loss["gradients"]:
                loss["gradients"][gradient]["weight"] = weight
    return expanded


def metric(key: str, unit: str, value: float) -> tuple[str, float]:
    """One of metatrain's logged values as our metric, converted to meV:
    `validation energy RMSE (per atom)`, `hartree` -> `val_energy_rmse_meV_per_atom`."""
    short = {"training": "train", "validation": "val", "forces": "force"}
    words = [short.get(word, word) for word in key.replace("(per atom)", "").lower().split()]
    name = "_".join(words)
    if not unit:
        return name, value
    canonical = units.FORCE if "/" in unit else units.ENERGY  # forces, or energy and virial
    name += "_" + canonical.replace("/", "_per_")
    if "(per atom)" in key:
        name += "_per_atom"
    return name, value * units.factor(unit.replace("Å", "A"), canonical)


def metric_name(key: str, unit: str) -> str:
    return metric(key, unit, 0.0)[0]


class EpochHandler(logging.Handler):
    """Receives metatrain's structured per-epoch row (`MetricLogger` -> `emit_data`)."""

    def __init__(self, callback: Callable[[int, dict[str, float]], None]) -> None:
        super().__init__(level=logging.CRITICAL + 1)  # plain log records are not ours
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - level filters all
        pass

    def emit_data(self, keys: list[str], values: list[str], units: list[str]) -> None:
        row = dict(metric(k, u, float(v)) for k, v, u in zip(keys, values, units, strict=True))
        epoch = int(row.pop("epoch"))
        self.callback(epoch, row)


@contextlib.contextmanager
def _scheduler(kind: str, step_size_epochs: int, gamma: float) -> Iterator[None]:
    """Swap the LR schedule of metatrain's PET trainer (cosine with warmup only)."""
    if kind == "cosine":
        yield
        return
    original = pet_trainer.get_scheduler

    def make(optimizer: torch.optim.Optimizer, hypers: dict, steps_per_epoch: int):
        def factor(step: int) -> float:
            epoch = step // max(1, steps_per_epoch)
            if kind == "constant":
                return 1.0
            if kind == "step":
                return gamma ** (epoch // step_size_epochs)
            return gamma**epoch  # exponential

        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)

    pet_trainer.get_scheduler = make
    try:
        yield
    finally:
        pet_trainer.get_scheduler = original


@contextlib.contextmanager
def _penalised(penalty: Callable[[], torch.Tensor] | None) -> Iterator[None]:
    """Add `penalty()` to metatrain's training loss (its trainer has no hook for a regulariser).

    Only where gradients flow: the validation loss metatrain logs stays the data's alone.
    """
    if penalty is None:
        yield
        return
    original = pet_trainer.LossAggregator

    class Penalised(original):  # type: ignore[misc, valid-type]
        def __call__(self, *args, **kwargs) -> torch.Tensor:
            loss = super().__call__(*args, **kwargs)
            return loss + penalty() if torch.is_grad_enabled() else loss

    pet_trainer.LossAggregator = Penalised
    try:
        yield
    finally:
        pet_trainer.LossAggregator = original


@contextlib.contextmanager
def _batches(replay_size: int | None, counts: list[int]) -> Iterator[None]:
    """Batches of `replay_size` structures for every training set after the first (the replayed
    ones; metatrain's trainer has one batch size for all); `counts` gets each set's batches per
    epoch, as metatrain's loaders give them."""
    original = pet_trainer.build_train_dataloaders

    def build(*, train_datasets: list, train_distributed_samplers: list, batch_size: int, **kwargs):
        loaders, samplers = [], []
        for datasets, size in ((slice(0, 1), batch_size), (slice(1, None), replay_size or batch_size)):
            more, more_samplers = original(
                train_datasets=train_datasets[datasets],
                train_distributed_samplers=train_distributed_samplers[datasets],
                batch_size=size,
                **kwargs,
            )
            loaders += more
            samplers += more_samplers
        counts[:] = [len(loader) for loader in loaders]
        return loaders, samplers

    pet_trainer.build_train_dataloaders = build
    try:
        yield
    finally:
        pet_trainer.build_train_dataloaders = original


@dataclass
class TrainResult:
    best_epoch: int
    last_epoch: int
    state: dict[str, torch.Tensor]  # best-validation weights
    trainer: Trainer
    batches_per_epoch: list[int]  # of each training set


class StopTraining(Exception):
    """Raised from an epoch callback to end training early (early stopping, pruning).

    metatrain reports an epoch before it considers it for the best model, so the epoch
    that raises is not a candidate: early stopping only raises on a non-improving one.
    """

    def __init__(self, epoch: int, reason: str) -> None:
        super().__init__(reason)
        self.epoch = epoch


def train(
    model: PET,
    hypers: dict,
    train_sets: list[Dataset],
    val_sets: list[Dataset],
    device: torch.device,
    workdir: Path,
    on_epoch: Callable[[int, dict[str, float]], None],
    scheduler: tuple[str, int, float] = ("cosine", 1, 1.0),
    penalty: Callable[[], torch.Tensor] | None = None,
    select: Callable[[dict[str, float]], float] | None = None,
    separate_head: bool = False,
    replay_batch_size: int | None = None,
) -> TrainResult:
    """Train in-process with metatrain's PET trainer; `on_epoch` may raise StopTraining.

    Several training sets are metatrain's own multi-dataset training (each epoch draws
    batches from all of them). `penalty`, if given, is added to every training batch's loss.
    `select`, if given, scores each epoch's row (lower is better) and picks the epoch kept,
    instead of metatrain's `best_model_metric`. `separate_head`: the model has the new head of
    heads.py, which trains beside the strategy's weights; rows come in our usual names.
    `replay_batch_size`, if given, batches every training set after the first (replay).
    """
    trainer = Trainer(hypers)
    model.train()  # metatrain's trainer assumes it: in eval mode PET adds its composition
    best = _BestEpoch(model, select) if select is not None else None

    def each_epoch(epoch: int, row: dict[str, float]) -> None:
        row = heads.row_names(row) if separate_head else row
        if best is not None:
            best.consider(epoch, row)
        on_epoch(epoch, row)

    handler = EpochHandler(each_epoch)
    ROOT_LOGGER.addHandler(handler)
    last_epoch = hypers["num_epochs"] - 1
    batches: list[int] = []
    try:
        head = heads.trainable() if separate_head else contextlib.nullcontext()
        with (
            _scheduler(*scheduler),
            _penalised(penalty),
            _batches(replay_batch_size, batches),
            head,
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", category=UserWarning)
            trainer.train(model, torch.float32, [device], list(train_sets), list(val_sets), str(workdir))
    except StopTraining as stop:
        last_epoch = stop.epoch
    finally:
        ROOT_LOGGER.removeHandler(handler)
    if best is not None and best.state is not None:
        return TrainResult(best.epoch, last_epoch, best.state, trainer, batches)
    best_epoch = trainer.best_epoch if trainer.best_epoch is not None else last_epoch
    return TrainResult(best_epoch, last_epoch, _best_state(trainer, model), trainer, batches)


class _BestEpoch:
    """The weights of the best-scoring epoch so far. metatrain logs an epoch's row right after
    validating it and before the next step, so the live weights are the ones that row scored."""

    def __init__(self, model: PET, score: Callable[[dict[str, float]], float]) -> None:
        self.model, self.score = model, score
        self.best, self.epoch = float("inf"), -1
        self.state: dict[str, torch.Tensor] | None = None

    def consider(self, epoch: int, row: dict[str, float]) -> None:
        value = self.score(row)
        if value < self.best:
            self.best, self.epoch = value, epoch
            self.state = copy.deepcopy(self.model.state_dict())


def _best_state(trainer: Trainer, model: PET) -> dict[str, torch.Tensor]:
    state = trainer.best_model_state_dict
    if state is None:
        return model.state_dict()
    state = dict(state)
    state.pop("finetune_config", None)
    return state


def seed_everything(seed: int) -> None:
    """The same seeding as `mtt train`, so runs match it given the same seed."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def save_checkpoint(result: TrainResult, model: PET, path: Path) -> None:
    """Write a metatrain checkpoint of the best epoch (usable by `mtt train` and by us)."""
    model.load_state_dict(result.state)
    trainer = result.trainer
    # Fine-tuning starts a fresh optimizer: Adam's state would triple the file size.
    trainer.optimizer_state_dict = trainer.best_optimizer_state_dict = trainer.scheduler_state_dict = None
    trainer.save_checkpoint(model, path)
