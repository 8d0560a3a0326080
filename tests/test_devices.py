"""The device logic that needs no GPU: the one-line out-of-memory error and where
`gpu_memory_fraction` applies. (On a GPU: test_gpu.py; bad values: test_bad_input.py.)"""

from __future__ import annotations

import torch

from sweeper import devices

TORCH_SAYS = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 139.81 GiB of which "
    "139.20 GiB is free. Process 7 has 143.00 KiB memory in use. Of the allocated memory 0 bytes is "
    "allocated by PyTorch, and 0 bytes is reserved by PyTorch but unallocated. If reserved but unallocated "
    "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


def test_out_of_memory_is_one_line_that_says_what_to_change() -> None:
    said = devices.out_of_memory(torch.OutOfMemoryError(TORCH_SAYS))
    assert said == (
        "CUDA out of memory (tried to allocate 20.00 MiB): lower train.batch_size or "
        "hydra.sweeper.workers_per_gpu, or raise gpu_memory_fraction"
    )
    assert devices.out_of_memory(RuntimeError(TORCH_SAYS)) is None  # only torch's own error type


def test_the_memory_cap_leaves_the_cpu_alone() -> None:
    devices.cap_memory(torch.device("cpu"), 1e-6)  # no CUDA call: would raise without a GPU
    assert torch.zeros(1000).sum() == 0


def test_the_memory_cap_names_the_gpu_by_index(monkeypatch) -> None:
    """torch refuses `cuda` without an index (the first GPU run failed every trial on it)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *a: calls.append(a))
    devices.cap_memory(torch.device("cuda"), None)
    devices.cap_memory(torch.device("cuda:1"), 0.25)
    assert calls == [(1.0, 3), (0.25, 1)]
