"""The model's predictions next to the labels, structure by structure, in float64."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from metatomic.torch import systems_to_torch
from metatrain.pet import PET
from metatrain.utils.data import CollateFn, unpack_batch
from metatrain.utils.evaluate_model import evaluate_model
from metatrain.utils.neighbor_lists import (
    get_requested_neighbor_lists,
    get_system_with_neighbor_lists,
    get_system_with_neighbor_lists_transform,
)
from metatrain.utils.transfer import batch_to

from sweeper.metatrain.data import ENERGY_TARGET, Dataset, energy_target_info
from sweeper.metatrain.model import units

Pair = tuple[torch.Tensor, torch.Tensor]  # (predicted, reference)


@dataclass
class Batch:
    """One batch, predictions in the model's units, labels in the data's.

    `energy`: per structure; `gradient`: dE/dr per atom (N, 3), i.e. minus the forces;
    `strain`: dE/dε per structure (n, 3, 3), i.e. stress x volume or minus the virial.
    """

    energy: Pair
    gradient: Pair | None
    strain: Pair | None
    atoms: torch.Tensor  # per structure
    volumes: torch.Tensor  # per structure, in the data's length unit cubed


def predict(model: PET, dataset: Dataset, device: torch.device, batch_size: int = 16) -> list[Batch]:
    """Evaluate `model` on every structure of `dataset`, with the gradients it has labels for.

    Runs in eval mode (composition and scaler applied) with every weight frozen: whether a
    weight requires grad changes which kernels run (float32 results move at 1e-8), and
    evaluation must not depend on what trained. Both are restored afterwards.
    """
    model.to(device)
    labelled = dataset[0]._asdict()[ENERGY_TARGET].block().gradients_list()
    forces, strain = "positions" in labelled, "strain" in labelled
    target_info = {ENERGY_TARGET: energy_target_info(units(model)[0], forces, strain)}
    collate = CollateFn(
        target_keys=[ENERGY_TARGET],
        callables=[get_system_with_neighbor_lists_transform(get_requested_neighbor_lists(model))],
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    dtype = next(model.parameters()).dtype
    results = []
    with _frozen(model), _evaluating(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        for batch in loader:
            systems, targets, _ = unpack_batch(batch)
            volumes = torch.stack([system.cell.detach().double().det().abs() for system in systems]).cpu()
            systems, targets, _ = batch_to(systems, targets, {}, dtype=dtype, device=device)
            predictions = evaluate_model(model, systems, target_info, is_training=False)
            predicted, reference = predictions[ENERGY_TARGET].block(), targets[ENERGY_TARGET].block()
            results.append(
                Batch(
                    energy=(_values(predicted.values), _values(reference.values)),
                    gradient=_pair(predicted, reference, "positions", (-1, 3)) if forces else None,
                    strain=_pair(predicted, reference, "strain", (-1, 3, 3)) if strain else None,
                    atoms=torch.tensor([len(system) for system in systems], dtype=torch.float64),
                    volumes=volumes,
                )
            )
    return results


@dataclass
class Labelled:
    """The model's own labels for one structure, in its units: what base-labelled replay trains on."""

    energy: float
    forces: torch.Tensor | None  # (N, 3)
    virial: torch.Tensor | None  # (3, 3): minus dE/dε


def label(
    model: PET, structures: list, device: torch.device, forces: bool, strain: bool, batch_size: int = 16
) -> list[Labelled]:
    """Predict energies (and forces, virials) for ASE structures that need carry no labels."""
    target_info = {ENERGY_TARGET: energy_target_info(units(model)[0], forces, strain)}
    requested = get_requested_neighbor_lists(model)
    dtype = next(model.parameters()).dtype
    results = []
    with _frozen(model), _evaluating(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        model.to(device)
        for start in range(0, len(structures), batch_size):
            systems = [
                get_system_with_neighbor_lists(system, requested).to(dtype=dtype, device=device)
                for system in systems_to_torch(structures[start : start + batch_size], dtype=torch.float64)
            ]
            block = evaluate_model(model, systems, target_info, is_training=False)[ENERGY_TARGET].block()
            energies = _values(block.values)
            gradients = _values(block.gradient("positions").values, (-1, 3)) if forces else None
            strains = _values(block.gradient("strain").values, (-1, 3, 3)) if strain else None
            first = 0
            for index, system in enumerate(systems):
                atoms = len(system)
                results.append(
                    Labelled(
                        energy=float(energies[index]),
                        forces=-gradients[first : first + atoms] if forces else None,
                        virial=-strains[index] if strain else None,
                    )
                )
                first += atoms
    return results


def _values(values: torch.Tensor, shape: tuple[int, ...] = (-1,)) -> torch.Tensor:
    return values.detach().double().cpu().reshape(shape)


def _pair(predicted: object, reference: object, gradient: str, shape: tuple[int, ...]) -> Pair:
    return (
        _values(predicted.gradient(gradient).values, shape),
        _values(reference.gradient(gradient).values, shape),
    )


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block: metatrain's trainer never calls `train()` itself, so a
    model left in eval mode would train with its composition added to the predictions."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


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
