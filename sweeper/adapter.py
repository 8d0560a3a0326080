"""The adapter artifact: the tensors a fine-tuning run trained, and how to re-apply them.

A folder with `adapter_model.safetensors` (for LoRA only the `lora_*` tensors, ~30 KB
against a 3.5 MB checkpoint) and `adapter_config.json`, which carries a format version
and everything needed to rebuild the adapted model from the base checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sweeper import pet
from sweeper.embedded import file_sha256

FORMAT_VERSION = 1
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
        "metatrain_version": pet.METATRAIN_VERSION,
        "atomic_types": atomic_types,
        "targets": targets,
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
    if config.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{path}: format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return config


def apply(folder: Path, base_checkpoint: str | Path) -> pet.PET:
    """The base model with the adapter applied, in eval mode.

    Refuses a base checkpoint other than the one the adapter was trained on.
    """
    config = read_config(folder)
    sha = file_sha256(base_checkpoint)
    if sha != config["base_checkpoint_sha256"]:
        raise AdapterError(
            f"{base_checkpoint}: sha256 {sha[:12]}… is not the adapter's base "
            f"({config['base_checkpoint_sha256'][:12]}…)"
        )
    model = pet.load_checkpoint(base_checkpoint)
    if config["method"] == "lora":
        strategy = pet.finetune_strategy(
            "lora", base_checkpoint, config["rank"], config["alpha"], config["target_modules"]
        )
        model = pet.apply_strategy(model, strategy, zero_lora_b=True)
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    untrained = set(pet.trainable_tensors(model)) - set(tensors) if config["method"] == "lora" else set()
    if untrained:
        raise AdapterError(f"{folder}: adapter lacks tensors {sorted(untrained)[:3]}")
    pet.load_state(model, tensors, strict=False)
    model.eval()
    return model
