"""Which torch device a trial runs on, with clear errors for impossible requests, and the
CPU cores it may use.

torch is imported inside the functions that need it: the sweep's controller asks for
`usable_cores` and stays free of torch (its workers pick their GPU before loading it).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from sweeper.config import ConfigError

if TYPE_CHECKING:
    import torch


def resolve(name: str) -> torch.device:
    """`auto` -> CUDA when available else CPU; `cuda`/`cuda:N` must exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA GPU is visible to this process (use device=cpu or auto)")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return device


def describe(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask under SLURM or taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
