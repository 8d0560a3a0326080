"""The PET model: loading a checkpoint, its fine-tuning strategy, its energy offsets."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import metatensor.torch as mts
import torch
from metatrain.pet import PET
from metatrain.pet.modules.finetuning import LoRALinear, apply_finetuning_strategy
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.io import model_from_checkpoint
from omegaconf import OmegaConf

from sweeper.metatrain.data import ENERGY_TARGET


class CheckpointError(ValueError):
    """The file is not a usable PET checkpoint."""


def load_checkpoint(path: str | Path) -> PET:
    """Load a PET checkpoint for fine-tuning; a clear error for anything else."""
    try:
        checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as error:  # torch raises many kinds for a non-checkpoint file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(error)})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("architecture_name") != "pet":
        found = checkpoint.get("architecture_name") if isinstance(checkpoint, dict) else None
        raise CheckpointError(f"{path}: not a PET checkpoint (architecture {found!r})")
    try:
        return model_from_checkpoint(checkpoint, context="finetune")
    except Exception as error:  # a truncated or foreign-version checkpoint
        raise CheckpointError(
            f"{path}: cannot load this PET checkpoint ({type(error).__name__}: {_first_line(error)})"
        ) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def atomic_types(model: PET) -> list[int]:
    return [int(z) for z in model.dataset_info.atomic_types]


def targets(model: PET) -> list[str]:
    return list(model.dataset_info.targets)


def units(model: PET) -> tuple[str, str]:
    """(energy unit, length unit) the model was trained in."""
    return model.dataset_info.targets[ENERGY_TARGET].unit, model.dataset_info.length_unit


def new_model(model_hypers: dict, info: DatasetInfo) -> PET:
    hypers = OmegaConf.merge(get_default_hypers("pet", base_precision=32)["model"], model_hypers)
    return PET(OmegaConf.to_container(hypers), info)


def restart_for(model: PET, info: DatasetInfo) -> PET:
    """Attach the fine-tuning targets (same names as the base's keeps its heads).

    The base's other targets (e.g. `non_conservative_force`) are marked stale: a `lora`
    or `full` run drops them once its strategy is applied, `heads` keeps them.
    """
    return model.restart(info)


def keep_only(model: PET, kept: list[str]) -> PET:
    """Restart a freshly loaded base on `kept` of its own targets, as a trial did."""
    info = model.dataset_info
    return model.restart(
        DatasetInfo(
            length_unit=info.length_unit,
            atomic_types=list(info.atomic_types),
            targets={name: info.targets[name] for name in kept},
        )
    )


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


def anchor_penalty(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
    """L2-SP's sum of squared distances to the base, over what trains.

    For LoRA the distance is the update itself, scaling x B @ A of each adapted layer (the
    weight the model uses minus the base's); for the other methods each trainable parameter
    against its value now, before training. What trains is read at the first call: metatrain's
    trainer sets it when training starts.
    """
    layers = lora_layers(model)
    if layers:

        def lora_update() -> torch.Tensor:
            return sum(
                ((layer.scaling * layer.lora_B.weight @ layer.lora_A.weight) ** 2).sum() for layer in layers
            )

        return lora_update

    start = {name: param.detach().clone() for name, param in model.named_parameters()}
    pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def distance() -> torch.Tensor:
        if not pairs:
            pairs.extend(
                (param, start[name].to(param.device, param.dtype))
                for name, param in model.named_parameters()
                if param.requires_grad
            )
        return sum(((param - base) ** 2).sum() for param, base in pairs)

    return distance


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


def load_state(model: PET, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (strict and missing):
        raise ValueError(f"state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ------------------------------------------------------------- energy references


def add_energy_offsets(model: PET, offsets: dict[int, float]) -> None:
    """Add per-element constants (model energy units) to the energy's composition weights.

    The composition model is frozen by every fine-tuning method; its weights live in a
    serialized float64 buffer that metatrain reloads them from. The sum is taken there, in
    float64, so the trial's model and a re-applied adapter hold the same bits, and the
    offsets travel with `state_dict`, checkpoints and exported models.
    """
    if not offsets:
        return
    composition = model.additive_models[0]
    buffer = getattr(composition, _BUFFER)
    weights = mts.load_buffer(buffer.to(device="cpu"))
    block = weights.block()
    types = [int(z) for z in block.samples.column("center_type")]
    with torch.no_grad():
        for z, offset in offsets.items():
            block.values[types.index(int(z))] += float(offset)
    _store(composition, mts.save_buffer(mts.make_contiguous(weights)).to(buffer.device))


def energy_composition(model: PET) -> dict[int, float]:
    """The energy's per-element composition weights (model energy units), as a dict."""
    weights = mts.load_buffer(getattr(model.additive_models[0], _BUFFER).to(device="cpu")).block()
    types = [int(z) for z in weights.samples.column("center_type")]
    return dict(zip(types, weights.values.reshape(-1).tolist(), strict=True))


@contextlib.contextmanager
def energy_offsets_removed(model: PET, offsets: dict[int, float]) -> Iterator[PET]:
    """The model back in its base's energy reference while the block runs, then exactly
    as it was (restored, not re-added: float sums do not always undo)."""
    if not offsets:
        yield model
        return
    composition = model.additive_models[0]
    saved = getattr(composition, _BUFFER).clone()
    add_energy_offsets(model, {z: -value for z, value in offsets.items()})
    try:
        yield model
    finally:
        _store(composition, saved)


_BUFFER = f"{ENERGY_TARGET}_composition_buffer"


def _store(composition: Any, buffer: torch.Tensor) -> None:
    composition.register_buffer(_BUFFER, buffer)
    composition.sync_tensor_maps()  # the live weights, from the buffer
