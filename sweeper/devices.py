"""Which torch device a trial runs on, with clear errors for impossible requests, and the
CPU cores it may use.

torch is imported inside the functions that need it: the sweep's controller asks for
`usable_cores` and stays free of torch (its workers pick their GPU before loading it).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from sweeper.config import ConfigError

if TYPE_CHECKING:
    import torch


NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve(name: str, key: str = "device") -> torch.device:
    """`auto` -> CUDA when available else CPU; `cuda`/`cuda:N` must exist. `key`: what the
    one-line error names (the config key, or a command-line flag)."""
    import torch

    if NAMES.fullmatch(name) is None:
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={name}: no CUDA GPU is visible to this process (use cpu or auto)")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return device


def cap_memory(device: torch.device, fraction: float | None) -> None:
    """`gpu_memory_fraction`: the share of the GPU's memory this process's allocator may take, so
    that of several workers on one GPU the one that outgrows its share fails alone (out of
    memory) instead of starving the others. Set on every trial: a worker runs many."""
    import torch

    if device.type == "cuda":  # torch wants the index: `cuda` is the current device
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.set_per_process_memory_fraction(1.0 if fraction is None else fraction, index)


def out_of_memory(error: BaseException) -> str | None:
    """A CUDA out-of-memory error as one line that says what to change (torch's own message is a
    paragraph about the allocator); None for any other error."""
    import torch

    if not isinstance(error, torch.OutOfMemoryError):
        return None
    said = str(error).split(". ")  # "CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has ..."
    tried = next((part for part in said if part.startswith("Tried to allocate")), "")
    return (
        f"CUDA out of memory{f' ({tried[0].lower()}{tried[1:]})' if tried else ''}: lower "
        "train.batch_size or hydra.sweeper.workers_per_gpu, or raise gpu_memory_fraction"
    )


def describe(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask under SLURM or taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
