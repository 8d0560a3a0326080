"""The sweep runner: `python -m sweeper` as a user runs it, one trial or a `-m` sweep, on the tiny
slices of the embedded data that conftest's `tiny_data` fixture writes (a trial takes seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.tracking import runs
from sweeper import config

SWEEPER = [sys.executable, "-m", "sweeper"]


def tiny_overrides(tiny_data: dict[str, Path], workdir: Path) -> list[str]:
    return [
        f"data.finetune.train={tiny_data['train']}",
        f"data.finetune.validation={tiny_data['validation']}",
        f"data.finetune.test={tiny_data['test']}",
        f"data.original.path={tiny_data['original']}",
        "train.epochs=3",
        "train.batch_size=4",
        "lora.rank=4",
        "threads=2",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def merged(*groups: list[str] | str) -> list[str]:
    """Overrides, the last value of a key winning (Hydra refuses a key given twice)."""
    chosen: dict[str, str] = {}
    for group in groups:
        for override in [group] if isinstance(group, str) else group:
            chosen[override.split("=", 1)[0]] = override
    return list(chosen.values())


def compose_config(overrides: list[str]):
    return config.composed(overrides)


def run_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [*SWEEPER, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trial_cli(overrides: list[str], workdir: Path):
    """`python -m sweeper` in `workdir`, as a user runs it: it succeeds; (its output, its one run)."""
    done = run_cli(overrides, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs(workdir)
    return done, run


def sweep_cli(tiny_data: dict[str, Path], workdir: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`python -m sweeper -m` on tiny data, 2 epochs per trial."""
    base = [a for a in tiny_overrides(tiny_data, workdir) if not a.startswith("train.epochs")]
    return run_cli(["-m", *base, "train.epochs=2", "data.original.max_structures=4", *arguments], cwd=workdir)


def sweep_args(tiny_data: dict[str, Path], workdir: Path, *arguments: str) -> list[str]:
    """`-m` and the overrides of a sweep on tiny data: ranks 2 and 4, no pruning, one thread per
    trial (several workers or controllers share the cores: more threads than cores slow every
    one of them down). An argument replaces the default of its key (e.g. `tracking.uri=http://...`)."""
    defaults = [*tiny_overrides(tiny_data, workdir), "data.original.max_structures=4",
                "hydra/sweeper/pruner=none", "lora.rank=2,4", "threads=1"]  # fmt: skip
    return ["-m", *merged(defaults, list(arguments))]
