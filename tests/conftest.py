"""The fixtures every test file may ask for: a fresh cache, tiny slices of the embedded data, a
PostgreSQL server. The helpers the tests import are in tests/helpers/. The end-to-end tests
(sweeps, workers, servers, clusters) are marked `slow` where they are written: `pytestmark` in
their modules, `@pytest.mark.slow` on the others."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from ase.io import read, write
from helpers import postgres_server

from sweeper import config, embedded

pytest_plugins = ["helpers.outside_data"]  # data and base models that are not ours

config.register()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.sh)"))


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache for the whole session (embedded data, base errors)."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["PET_LORA_SWEEPER_CACHE"] = str(root)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    return root


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_the_tests() -> None:
    """The signal tests press Ctrl-C (SIGINT) as a user does. A shell that starts pytest in the
    background without job control (`cmd &` in a script) makes it and every process it starts
    ignore SIGINT; a sweep rightly leaves an ignored SIGINT ignored, so those tests would fail."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # children start with SIGINT's default


@pytest.fixture(scope="session")
def embedded_paths(cache_dir: Path) -> dict[str, Path]:
    return embedded.ensure_datasets()


@pytest.fixture(scope="session")
def tiny_data(embedded_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small slices of the embedded sets, so a trial takes seconds."""
    folder = tmp_path_factory.mktemp("tiny")
    sizes = {"train": 8, "validation": 4, "test": 4, "original": 6}
    paths = {}
    for role, count in sizes.items():
        paths[role] = folder / f"{role}.xyz"
        write(paths[role], read(embedded_paths[role], index=f":{count}"), format="extxyz")
    return paths


@pytest.fixture(scope="session")
def postgres() -> Iterator[postgres_server.Server]:
    """A PostgreSQL server: the one $PET_LORA_SWEEPER_TEST_POSTGRES names, else a throwaway one for the
    session (tests/helpers/postgres_server.py); `postgres.database(prefix)` makes a fresh database on it."""
    try:
        with postgres_server.configured_or_throwaway() as server:
            yield server
    except postgres_server.NoPostgreSQL as missing:
        pytest.skip(str(missing))
