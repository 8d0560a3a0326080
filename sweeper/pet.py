"""Everything that touches metatrain internals, behind a few functions.

metatrain's Python training API is not public (metatrain issue #581), so this is the
only module of ours that imports it; the project pins a narrow metatrain range and
this file is what changes when that range moves.
"""

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
from typing import Any

import metatrain
import metatrain.pet.trainer as pet_trainer
import numpy as np
import torch
from metatrain.pet import PET, Trainer
from metatrain.pet.modules.finetuning import LoRALinear, apply_finetuning_strategy
from metatrain.utils.architectures import check_architecture_options, get_default_hypers
from metatrain.utils.data import CollateFn, DatasetInfo, get_atomic_types, get_dataset, unpack_batch
from metatrain.utils.evaluate_model import evaluate_model
from metatrain.utils.io import model_from_checkpoint
from metatrain.utils.logging import ROOT_LOGGER
from metatrain.utils.neighbor_lists import (
    get_requested_neighbor_lists,
    get_system_with_neighbor_lists_transform,
)
from metatrain.utils.omegaconf import expand_dataset_config, expand_loss_config
from metatrain.utils.transfer import batch_to
from omegaconf import OmegaConf

METATRAIN_VERSION: str = metatrain.__version__
ENERGY_TARGET = "energy"

Dataset = Any  # metatrain.utils.data.Dataset or a torch Subset of one


class CheckpointError(ValueError):
    """The file is not a usable PET checkpoint."""


@dataclass(frozen=True)
class Labels:
    """How energies and forces are stored in an ASE-readable file."""

    energy_key: str = "energy"
    energy_unit: str = "eV"
    forces_key: str | None = "forces"  # None: train and evaluate on energies only
    length_unit: str = "angstrom"


# --------------------------------------------------------------------------- data


def read_dataset(path: str | Path, labels: Labels) -> tuple[Dataset, dict]:
    """Read structures and labels with metatrain's own reader (any ASE format)."""
    forces: Any = {"read_from": str(path), "key": labels.forces_key} if labels.forces_key else False
    conf = {
        "systems": {"read_from": str(path), "length_unit": labels.length_unit},
        "targets": {
            ENERGY_TARGET: {
                "key": labels.energy_key,
                "unit": labels.energy_unit,
                "forces": forces,
                "stress": False,
                "virial": False,
            }
        },
    }
    options = expand_dataset_config(OmegaConf.create(conf))[0]
    dataset, target_info, _ = get_dataset(options)
    return dataset, target_info


def atomic_types(datasets: list[Dataset]) -> list[int]:
    return [int(z) for z in get_atomic_types(datasets)]


def dataset_info(atomic_types: list[int], target_info: dict, length_unit: str) -> DatasetInfo:
    return DatasetInfo(length_unit=length_unit, atomic_types=atomic_types, targets=target_info)


# -------------------------------------------------------------------------- model


def load_checkpoint(path: str | Path) -> PET:
    """Load a PET checkpoint for fine-tuning; a clear error for anything else."""
    try:
        checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as error:  # torch raises many kinds for a non-checkpoint file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("architecture_name") != "pet":
        found = checkpoint.get("architecture_name") if isinstance(checkpoint, dict) else None
        raise CheckpointError(f"{path}: not a PET checkpoint (architecture {found!r})")
    return model_from_checkpoint(checkpoint, context="finetune")


def model_atomic_types(model: PET) -> list[int]:
    return [int(z) for z in model.dataset_info.atomic_types]


def model_targets(model: PET) -> list[str]:
    return list(model.dataset_info.targets)


def new_model(model_hypers: dict, info: DatasetInfo) -> PET:
    hypers = OmegaConf.merge(get_default_hypers("pet", base_precision=32)["model"], model_hypers)
    return PET(OmegaConf.to_container(hypers), info)


def restart_for(model: PET, info: DatasetInfo) -> PET:
    """Attach the fine-tuning targets (same names as the base's keeps its heads)."""
    return model.restart(info)


def finetune_strategy(
    method: str, checkpoint: str | Path, rank: int, alpha: float, target_modules: list[str]
) -> dict:
    strategy: dict[str, Any] = {"read_from": str(checkpoint), "method": method, "inherit_heads": {}}
    if method == "lora":
        strategy["config"] = {"rank": rank, "alpha": alpha, "target_modules": list(target_modules)}
    elif method == "heads":
        strategy["config"] = {
            "head_modules": ["node_heads", "edge_heads"],
            "last_layer_modules": ["node_last_layers", "edge_last_layers"],
        }
    else:
        strategy["config"] = {}
    return strategy


def apply_strategy(model: PET, strategy: dict, zero_lora_b: bool) -> PET:
    """Inject LoRA (or pick the heads) and freeze the rest, before training starts.

    metatrain initialises both LoRA matrices randomly, so its adapted model differs from
    the base before any step; standard LoRA zeroes B so training starts from the base.
    Doing the injection here (metatrain's trainer then only re-freezes) consumes the
    random stream exactly as `mtt train` does, keeping `lora.init=metatrain` at parity.
    """
    model = apply_finetuning_strategy(model, strategy)
    if zero_lora_b:
        with torch.no_grad():
            for module in lora_layers(model):
                module.lora_B.weight.zero_()
    return model


def lora_layers(model: torch.nn.Module) -> list[LoRALinear]:
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def linear_attribute_names(model: torch.nn.Module) -> set[str]:
    """Attribute names of every nn.Linear: what `lora.target_modules` may name."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a fine-tuning run changes: `lora_*` for LoRA, else what requires grad."""
    state = model.state_dict()
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    return {name: state[name].detach().cpu().contiguous() for name in names}


def best_state(trainer: Trainer, model: PET) -> dict[str, torch.Tensor]:
    state = trainer.best_model_state_dict
    if state is None:
        return model.state_dict()
    state = dict(state)
    state.pop("finetune_config", None)
    return state


# ----------------------------------------------------------------------- training


def training_hypers(overrides: dict, strategy: dict | None, labels: Labels) -> dict:
    """metatrain's fully expanded `architecture.training` section for PET."""
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
    forces = {"read_from": "unused", "key": labels.forces_key} if labels.forces_key else False
    options = OmegaConf.create(
        {
            "architecture": {"training": training},
            "training_set": {"targets": {ENERGY_TARGET: {"forces": forces}}},
        }
    )
    expanded = expand_loss_config(options)
    return OmegaConf.to_container(expanded.architecture.training, resolve=True)


class EpochHandler(logging.Handler):
    """Receives metatrain's structured per-epoch row (`MetricLogger` -> `emit_data`)."""

    def __init__(self, callback: Callable[[int, dict[str, float]], None]) -> None:
        super().__init__(level=logging.CRITICAL + 1)  # plain log records are not ours
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - level filters all
        pass

    def emit_data(self, keys: list[str], values: list[str], units: list[str]) -> None:
        row = {metric_name(k, u): float(v) for k, v, u in zip(keys, values, units, strict=True)}
        epoch = int(row.pop("epoch"))
        self.callback(epoch, row)


def metric_name(key: str, unit: str) -> str:
    """`validation energy RMSE (per atom)`, `meV` -> `val_energy_rmse_meV_per_atom`."""
    short = {"training": "train", "validation": "val", "forces": "force"}
    words = [short.get(word, word) for word in key.replace("(per atom)", "").lower().split()]
    name = "_".join(words)
    if unit:
        name += "_" + unit.replace("/", "_per_").replace("Å", "A")
        if "(per atom)" in key:
            name += "_per_atom"
    return name


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


@dataclass
class TrainResult:
    best_epoch: int
    last_epoch: int
    state: dict[str, torch.Tensor]  # best-validation weights
    trainer: Trainer


def train(
    model: PET,
    hypers: dict,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    workdir: Path,
    on_epoch: Callable[[int, dict[str, float]], None],
    scheduler: tuple[str, int, float] = ("cosine", 1, 1.0),
) -> TrainResult:
    """Train in-process with metatrain's PET trainer; `on_epoch` may raise StopTraining."""
    trainer = Trainer(hypers)
    handler = EpochHandler(on_epoch)
    ROOT_LOGGER.addHandler(handler)
    last_epoch = hypers["num_epochs"] - 1
    try:
        with _scheduler(*scheduler), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            trainer.train(model, torch.float32, [device], [train_set], [val_set], str(workdir))
    except StopTraining as stop:
        last_epoch = stop.epoch
    finally:
        ROOT_LOGGER.removeHandler(handler)
    best_epoch = trainer.best_epoch if trainer.best_epoch is not None else last_epoch
    return TrainResult(best_epoch, last_epoch, best_state(trainer, model), trainer)


class StopTraining(Exception):
    """Raised from an epoch callback to end training early (early stopping, pruning).

    metatrain reports an epoch before it considers it for the best model, so the epoch
    that raises is not a candidate: early stopping only raises on a non-improving one.
    """

    def __init__(self, epoch: int, reason: str) -> None:
        super().__init__(reason)
        self.epoch = epoch


# --------------------------------------------------------------------- evaluation


Prediction = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]


def predict(model: PET, dataset: Dataset, device: torch.device, batch_size: int = 16) -> list[Prediction]:
    """Per batch: (predicted E, reference E, predicted -F, reference -F, atoms per structure).

    Runs with every weight frozen: whether a weight requires grad changes which kernels
    run (float32 results move at 1e-8), and evaluation must not depend on what trained.
    """
    model.eval()
    model.to(device)
    target_info = {ENERGY_TARGET: model.dataset_info.targets[ENERGY_TARGET]}
    first = dataset[0]._asdict()
    has_forces = "positions" in first[ENERGY_TARGET].block().gradients_list()
    if not has_forces:
        target_info = {ENERGY_TARGET: _without_gradients(target_info[ENERGY_TARGET])}
    collate = CollateFn(
        target_keys=[ENERGY_TARGET],
        callables=[get_system_with_neighbor_lists_transform(get_requested_neighbor_lists(model))],
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    dtype = next(model.parameters()).dtype
    results = []
    with _frozen(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        for batch in loader:
            systems, targets, _ = unpack_batch(batch)
            systems, targets, _ = batch_to(systems, targets, {}, dtype=dtype, device=device)
            predictions = evaluate_model(model, systems, target_info, is_training=False)
            predicted, reference = predictions[ENERGY_TARGET].block(), targets[ENERGY_TARGET].block()
            atoms = torch.tensor([len(system) for system in systems], dtype=torch.float64)
            results.append(
                (
                    predicted.values.detach().double().cpu().reshape(-1),
                    reference.values.detach().double().cpu().reshape(-1),
                    _gradient(predicted) if has_forces else None,
                    _gradient(reference) if has_forces else None,
                    atoms,
                )
            )
    return results


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _gradient(block: Any) -> torch.Tensor:
    return block.gradient("positions").values.detach().double().cpu().reshape(-1, 3)


def _without_gradients(info: Any) -> Any:
    info = copy.deepcopy(info)
    info.gradients = []  # energies only: skip the autograd pass
    return info


def load_state(model: PET, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (strict and missing):
        raise ValueError(f"state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def seed_everything(seed: int) -> None:
    """The same seeding as `mtt train`, so runs match it given the same seed."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def save_checkpoint(result: TrainResult, model: PET, path: Path) -> None:
    """Write a metatrain checkpoint of the best epoch (usable by `mtt train` and by us)."""
    load_state(model, result.state)
    trainer = result.trainer
    # Fine-tuning starts a fresh optimizer: Adam's state would triple the file size.
    trainer.optimizer_state_dict = trainer.best_optimizer_state_dict = trainer.scheduler_state_dict = None
    trainer.save_checkpoint(model, path)


# ------------------------------------------------------------------------ export


def merge_lora(model: PET) -> PET:
    """A copy whose LoRA layers are folded into plain Linears: W + (alpha/rank) B A.

    The merged model runs at the base model's cost and exports without metatrain's
    LoRA class; its energies move by ~1e-6 eV against the unmerged model (float32).
    """
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        linear = module.linear
        with torch.no_grad():
            linear.weight += module.scaling * (module.lora_B.weight @ module.lora_A.weight)
        parent_name, _, attribute = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, attribute, linear)
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    return merged.eval()


def export(model: PET, path: Path | None = None) -> Any:
    """The TorchScript `AtomisticModel` metatomic's ASE calculator and MD engines load."""
    atomistic = model.export()
    if path is not None:
        atomistic.save(str(path))
    return atomistic
