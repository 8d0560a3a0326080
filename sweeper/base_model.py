"""The base model a trial starts from: loaded once, checked against the data and the config.

metatrain checkpoints are pickles (`torch.load(weights_only=False)`): loading one runs
whatever code it holds. `model.sha256` pins the file, checked before it is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sweeper import metatrain as mtt
from sweeper.config import Config, ConfigError, Method
from sweeper.files import file_sha256


def load(model: Any) -> tuple[mtt.PET, str]:
    """The base PET of `model.checkpoint` and its sha256, refused before unpickling on a mismatch."""
    checkpoint = model.checkpoint
    if not Path(checkpoint).is_file():
        raise ConfigError(f"model.checkpoint: file not found: {checkpoint}")
    sha = file_sha256(checkpoint)
    if model.sha256 is not None and sha != model.sha256.lower():
        raise ConfigError(
            f"model.checkpoint: {checkpoint} has sha256 {sha[:12]}…, model.sha256 asks for "
            f"{model.sha256[:12]}… (not loaded: checkpoints are pickles)"
        )
    try:
        return mtt.load_checkpoint(checkpoint), sha
    except mtt.CheckpointError as error:
        raise ConfigError(f"model.checkpoint: {error}") from None


def check_compatible(cfg: Config, base: mtt.PET, species: dict[str, set[int]]) -> None:
    """Elements, energy target, units and LoRA target modules the base must have for this config."""
    known = set(mtt.model_atomic_types(base))
    for role, found in species.items():
        unknown = sorted(found - known)
        if unknown:
            key = "data.original.path" if role in ("original", "replay") else f"data.finetune.{role}"
            raise ConfigError(
                f"{key}: atomic numbers {unknown} are unknown to the base model "
                f"(model.checkpoint knows {sorted(known)})"
            )
    if mtt.ENERGY_TARGET not in mtt.model_targets(base):
        raise ConfigError(
            f"model.checkpoint: the base model has no {mtt.ENERGY_TARGET!r} target "
            f"(it has {mtt.model_targets(base)})"
        )
    energy_unit, length_unit = mtt.model_units(base)
    if cfg.data.finetune.energy_unit != energy_unit:  # metatrain trains in the base's units
        raise ConfigError(
            f"data.finetune.energy_unit: {cfg.data.finetune.energy_unit!r} is not the base model's energy "
            f"unit {energy_unit!r} (metatrain fine-tunes in the base's units: convert the labels)"
        )
    groups = ["finetune"] + (["original"] if cfg.data.original.path is not None else [])
    for group in groups:  # positions are fed to the model as they are: same length unit
        if cfg.data[group].length_unit != length_unit:
            raise ConfigError(
                f"data.{group}.length_unit: {cfg.data[group].length_unit!r} is not the base model's "
                f"length unit {length_unit!r}"
            )
    if Method(cfg.finetune.method) == Method.lora:
        candidates = mtt.linear_attribute_names(base)
        for name in cfg.lora.target_modules:
            if name not in candidates:
                raise ConfigError(
                    f"lora.target_modules: {name!r} matches no nn.Linear of the base model "
                    f"(some that exist: {sorted(candidates)[:8]})"
                )
