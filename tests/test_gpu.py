"""On a CUDA GPU (marked `gpu`, skipped without one): a sweep's trial on `device=cuda`, an
out-of-memory error that fails only its trial, promote's verification and the ASE calculator
on CUDA. `benchmarks/gpu_check.sh` runs them on a GPU machine; the CPU parts of the same logic
(`gpu_memory_fraction`'s rule, the one-line out-of-memory error, `promote --device`) are tested
in test_devices.py."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from ase.io import read
from helpers.shell import plain_shell
from helpers.studies import sweep_study
from helpers.sweeps import sweep_cli
from helpers.tracking import mlflow_client, runs

from sweeper.registry import models

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

NAME = "base_pet_cu-lora"
OOM_FRACTION = 1e-6  # of the GPU's memory: less than the model's first tensor


@pytest.fixture(scope="module")
def cuda_sweep(tiny_data, tmp_path_factory) -> Path:
    """Two trials in one process on the GPU: the first capped below any allocation (out of memory),
    the second with the whole GPU after it (the seeded grid draws them in that order)."""
    workdir = tmp_path_factory.mktemp("cuda")
    done = sweep_cli(
        tiny_data, workdir, "device=cuda", "hydra/sweeper/sampler=grid", "hydra.sweeper.max_failure_rate=0.5",
        f"gpu_memory_fraction=1.0,{OOM_FRACTION}", "lora.rank=2", "lora.alpha=16", "train.lr=1e-3",
        "objective.retained_tolerance=100",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_a_trial_trains_evaluates_and_registers_on_the_gpu(cuda_sweep) -> None:
    (complete,) = [t for t in sweep_study(cuda_sweep).get_trials() if t.state.name == "COMPLETE"]
    run = mlflow_client(cuda_sweep).get_run(complete.user_attrs["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["device"].startswith("cuda")
    assert run.data.tags["device_name"] == torch.cuda.get_device_name()
    assert run.data.metrics["peak_gpu_memory_MB"] > 0
    assert np.isfinite(run.data.metrics["val_force_mae_meV_per_A"])
    assert run.data.tags.get("registered_version")


def test_out_of_memory_fails_only_its_trial_with_one_line(cuda_sweep) -> None:
    trials = sweep_study(cuda_sweep).get_trials()
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert failed.params["gpu_memory_fraction"] == OOM_FRACTION
    error = failed.user_attrs["error"]
    assert error.startswith("CUDA out of memory") and "train.batch_size" in error and "\n" not in error
    (complete,) = [t for t in trials if t.state.name == "COMPLETE"]
    assert failed.number < complete.number  # the same process trained on after the error
    statuses = {r.info.run_id: r.info.status for r in runs(cuda_sweep)}
    assert "RUNNING" not in statuses.values()
    if "run_id" in failed.user_attrs:
        assert statuses[failed.user_attrs["run_id"]] == "FAILED"


def test_promote_verifies_on_the_gpu(cuda_sweep) -> None:
    done = plain_shell("sweeper.promote", "--device", "cuda", cwd=cuda_sweep, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "on cuda" in done.stdout and "verified" in done.stdout and "is champion" in done.stdout


def test_the_ase_calculator_on_the_gpu_gives_the_cpu_numbers(cuda_sweep, tiny_data) -> None:
    (complete,) = [t for t in sweep_study(cuda_sweep).get_trials() if t.state.name == "COMPLETE"]
    run = mlflow_client(cuda_sweep).get_run(complete.user_attrs["run_id"])
    uri = f"models:/{NAME}/{run.data.tags['registered_version']}"
    mlflow.set_tracking_uri(f"sqlite:///{cuda_sweep / 'mlflow.db'}")  # as a user's script would
    frames = read(tiny_data["validation"], ":")
    found = {}
    for device in ("cuda", "cpu"):
        calculator = models.calculator(uri, device=device)
        energies, forces = [], []
        for atoms in frames:
            atoms.calc = calculator
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
        found[device] = np.array(energies), np.concatenate(forces)
    assert np.ptp(found["cuda"][0]) > 0  # a model's varied numbers, not a constant
    np.testing.assert_allclose(found["cuda"][0], found["cpu"][0], rtol=0, atol=1e-4)  # eV, float32
    np.testing.assert_allclose(found["cuda"][1], found["cpu"][1], rtol=0, atol=1e-4)  # eV/Å
