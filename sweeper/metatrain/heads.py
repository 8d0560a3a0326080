"""A second energy head for the fine-tuning data (`finetune.replay.head=separate`).

MACE's multihead fine-tuning, with metatrain's own multi-target training: the fine-tuning
data are read as the target `energy/finetune`, which `model.restart` gives a head of its own
(node and edge heads, last layers, composition and scaler) and `inherit_heads` starts as a copy
of the base's `energy` head; the replayed data keep training `energy`. The new head starts in
the base's units and reference: its scales are copied and its composition fixed to the base's
(plus the offsets of `energy_reference=refit`), so that it starts as the base predicts. After
training, `deploy` copies the new head into `energy`: the model a user runs predicts through it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import metatensor.learn as mtl
import metatrain.pet.trainer as pet_trainer
import torch
from metatrain.pet import PET
from metatrain.utils.data import DatasetInfo

from sweeper.metatrain.data import ENERGY_TARGET, Dataset
from sweeper.metatrain.model import energy_composition, load_state

HEAD = f"{ENERGY_TARGET}/finetune"


def with_head(info: DatasetInfo) -> DatasetInfo:
    """`info` with the new head's target beside `energy` (the same kind of target)."""
    return DatasetInfo(
        length_unit=info.length_unit,
        atomic_types=list(info.atomic_types),
        targets={**info.targets, HEAD: info.targets[ENERGY_TARGET]},
    )


def renamed(dataset: Dataset) -> Dataset:
    """The structures of `dataset` with their energy labelled as the new head's target."""
    samples = [dataset[i] for i in range(len(dataset))]
    fields = {name: [sample[k] for sample in samples] for k, name in enumerate(samples[0]._fields)}
    fields[HEAD] = fields.pop(ENERGY_TARGET)
    return mtl.Dataset(**fields)


def start_as_base(model: PET, offsets: dict[int, float]) -> dict[int, float]:
    """Give the new head the base's scales; returns its composition (per element, the base's
    plus `offsets`) for metatrain's `atomic_baseline`, which keeps the trainer from refitting it."""
    state = model.state_dict()
    scales = {
        name.replace(f"{ENERGY_TARGET}_", f"{HEAD}_", 1): value.clone()
        for name, value in state.items()
        if name.startswith(f"scaler.{ENERGY_TARGET}_")
    }
    model.load_state_dict(scales, strict=False)
    model.scaler.sync_tensor_maps()
    return {z: value + offsets.get(z, 0.0) for z, value in energy_composition(model).items()}


def unfreeze(model: torch.nn.Module) -> torch.nn.Module:
    """The new head's weights train, whatever the strategy froze (LoRA freezes all but its own)."""
    for name, param in model.named_parameters():
        if f".{HEAD}." in name:
            param.requires_grad_(True)
    return model


@contextlib.contextmanager
def trainable() -> Iterator[None]:
    """metatrain's trainer re-applies the fine-tuning strategy, and with it the freezing."""
    original = pet_trainer.apply_finetuning_strategy

    def unfrozen(model: torch.nn.Module, strategy: dict, **options: object) -> torch.nn.Module:
        return unfreeze(original(model, strategy, **options))

    pet_trainer.apply_finetuning_strategy = unfrozen
    try:
        yield
    finally:
        pet_trainer.apply_finetuning_strategy = original


def row_names(row: dict[str, float]) -> dict[str, float]:
    """An epoch row in our usual names: the new head's errors are the fine-tuning errors
    (`val_force_mae_meV_per_A`, ...), the base head's on the replayed data `train_replay_*`."""
    named = {}
    for name, value in row.items():
        if HEAD in name:  # `val_forces[energy/finetune]_mae_...`, `val_energy/finetune_mae_...`
            name = re.sub(rf"(\w+)\[{re.escape(HEAD)}\]", lambda m: m[1].removesuffix("s"), name)
            name = name.replace(HEAD, ENERGY_TARGET)
        elif name.startswith("train_") and name != "train_loss":
            name = name.replace("train_", "train_replay_", 1)
        named[name] = value
    return named


def deploy(model: PET) -> None:
    """Copy the new head's weights into `energy`'s, so that `energy` predicts through it."""
    state = model.state_dict()
    copied = {
        name.replace(HEAD, ENERGY_TARGET): value
        for name, value in state.items()
        if f".{HEAD}." in name and name.startswith("backend.")
    }
    load_state(model, copied, strict=False)  # raises if `energy` lacks one of them


def as_energy_head(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained tensors as the deployed model names them: the new head's as `energy`'s."""
    deployed = {name.replace(HEAD, ENERGY_TARGET): value for name, value in tensors.items() if HEAD in name}
    return {name: value for name, value in tensors.items() if HEAD not in name} | deployed
