"""The adapter artifact: the tensors a fine-tuning run trained, and how to re-apply them.

A folder with `adapter_model.safetensors` (for LoRA only the `lora_*` tensors, ~30 KB
against a 3.5 MB checkpoint) and `adapter_config.json`, which carries a format version
and everything needed to rebuild the adapted model from the base checkpoint: the method
and its settings, the targets the adapted model keeps (a `lora` or `full` run drops the
base's targets it did not train, e.g. `non_conservative_force`) and the per-element
energy offsets of `energy_reference=refit`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sweeper import metatrain as mtt
from sweeper.files import file_sha256

FORMAT_VERSION = 2  # 2: base_targets, energy_offsets
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter that cannot be applied (wrong base, missing files, unknown format)."""


def save(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    *,
    method: str,
    rank: int,
    alpha: float,
    target_modules: list[str],
    init: str,
    base_checkpoint_sha256: str,
    atomic_types: list[int],
    targets: list[str],
    base_targets: list[str],
    energy_offsets: dict[int, float],
) -> dict[str, Any]:
    """Write the adapter folder; returns its config."""
    folder.mkdir(parents=True, exist_ok=True)
    lora = method == "lora"
    config = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "rank": rank if lora else None,
        "alpha": alpha if lora else None,
        "scaling": alpha / rank if lora else None,
        "target_modules": list(target_modules) if lora else None,
        "init": init if lora else None,
        "base_checkpoint_sha256": base_checkpoint_sha256,
        "metatrain_version": mtt.METATRAIN_VERSION,
        "atomic_types": atomic_types,
        "targets": targets,  # what the adapted model predicts
        "base_targets": base_targets,  # what the base predicted
        "energy_offsets": {str(z): value for z, value in energy_offsets.items()},  # model units, per atom
        "tensors": sorted(tensors),
    }
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def digest(folder: Path) -> str:
    """sha256 over both files (config, then weights): what registry tags pin down."""
    sha = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        sha.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes())
    return sha.hexdigest()


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{folder}: not an adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads(path.read_text())
    if config.get("format_version") not in READABLE_VERSIONS:
        raise AdapterError(
            f"{path}: format_version {config.get('format_version')!r}, expected one of {READABLE_VERSIONS}"
        )
    return config


def energy_offsets(config: dict[str, Any]) -> dict[int, float]:
    return {int(z): float(value) for z, value in config.get("energy_offsets", {}).items()}


def apply(folder: Path, base_checkpoint: str | Path) -> mtt.PET:
    """The base model with the adapter applied, in eval mode: the same targets, weights
    and energy offsets as the trial's model.

    Refuses a base checkpoint other than the one the adapter was trained on.
    """
    config = read_config(folder)
    sha = file_sha256(base_checkpoint)
    if sha != config["base_checkpoint_sha256"]:
        raise AdapterError(
            f"{base_checkpoint}: sha256 {sha[:12]}… is not the adapter's base "
            f"({config['base_checkpoint_sha256'][:12]}…)"
        )
    model = mtt.load_checkpoint(base_checkpoint)
    missing = sorted(set(config["targets"]) - set(mtt.model_targets(model)))
    if missing:
        raise AdapterError(f"{folder}: the adapter predicts {missing}, which the base model lacks")
    model = mtt.keep_only(model, config["targets"])  # the strategy drops the others, as in training
    strategy = mtt.finetune_strategy(
        config["method"], base_checkpoint, config["rank"], config["alpha"], config["target_modules"]
    )
    model = mtt.apply_strategy(model, strategy, zero_lora_b=config["method"] == "lora")
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    untrained = set(mtt.trainable_tensors(model)) - set(tensors) if config["method"] == "lora" else set()
    if untrained:
        raise AdapterError(f"{folder}: adapter lacks tensors {sorted(untrained)[:3]}")
    mtt.load_state(model, tensors, strict=False)
    mtt.add_energy_offsets(model, energy_offsets(config))
    model.eval()
    return model
