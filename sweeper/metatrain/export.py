"""The adapted model as one plain PET: LoRA folded into the weights, then exported."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from metatrain.pet import PET
from metatrain.pet.modules.finetuning import LoRALinear


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
    """The TorchScript `AtomisticModel` metatomic's ASE calculator and MD engines load;
    its outputs are the model's targets (what a `lora` or `full` run kept)."""
    atomistic = model.export()
    if path is not None:
        atomistic.save(str(path))
    return atomistic
