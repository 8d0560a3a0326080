"""`finetune.replay.head=separate`: the fine-tuning data train a new energy head, the replayed
data the base's own, and the model a user deploys predicts through the new head. One trial from
the command line, then what a user does with it: promote (re-evaluation), export, ASE."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from ase.io import read
from helpers.shell import plain_shell
from helpers.sweeps import tiny_overrides, trial_cli
from helpers.tracking import mlflow_client

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

NAME = "base_pet_cu-lora"


@pytest.fixture(scope="module")
def separate(tiny_data, embedded_paths, tmp_path_factory):
    """A LoRA trial with 8 replayed structures on their own head (4 of the embedded original
    set measure retention), its energy reference refitted to the fine-tuning data."""
    workdir = tmp_path_factory.mktemp("separate")
    overrides = [
        *tiny_overrides(tiny_data, workdir), f"data.original.path={embedded_paths['original']}",
        "data.original.max_structures=4", "finetune.replay.structures=8", "finetune.replay.head=separate",
        "objective.retained_tolerance=100",
        "data.finetune.energy_reference=refit",  # the offsets go to the new head, and travel with it
    ]  # fmt: skip
    _, run = trial_cli(overrides, workdir)
    return workdir, run


def _ase_errors(model_file: Path, frames: list) -> tuple[float, float]:
    """Energy MAE (meV/atom) and force MAE (meV/Å) of an exported model through ASE."""
    from metatomic_ase import MetatomicCalculator

    calculator = MetatomicCalculator(str(model_file), device="cpu")
    energy, forces = [], []
    for atoms in frames:
        reference_e, reference_f = atoms.get_potential_energy(), atoms.get_forces()  # the file's labels
        atoms.calc = calculator
        energy.append(abs(atoms.get_potential_energy() - reference_e) / len(atoms))
        forces.append(np.abs(atoms.get_forces() - reference_f).ravel())
    return 1000 * float(np.mean(energy)), 1000 * float(np.mean(np.concatenate(forces)))


def test_the_run_logs_both_heads_and_the_adapter_carries_the_new_one(separate) -> None:
    workdir, run = separate
    metrics, params = run.data.metrics, run.data.params
    assert params["finetune.replay.head"] == "separate"
    assert run.data.tags["targets"] == "energy"  # what the deployed model predicts
    # The epoch rows use the usual names: the new head's are the fine-tuning errors.
    history = mlflow_client(workdir).get_metric_history(run.info.run_id, "epoch/val_force_mae_meV_per_A")
    assert len(history) == 3 and "epoch/train_replay_force_mae_meV_per_A" in metrics
    best = sorted(history, key=lambda m: m.step)[int(metrics["best_epoch"])].value
    assert metrics["val_force_mae_meV_per_A"] == pytest.approx(best, rel=1e-3)
    # The base head, trained on the replayed structures, is measured beside the deployed one.
    assert metrics["replay_head_retained_force_mae_ratio"] != metrics["retained_force_mae_ratio"]
    assert metrics["replay_head_retained_force_mae_ratio"] < metrics["retained_force_mae_ratio"]
    adapter = Path(mlflow_client(workdir).download_artifacts(run.info.run_id, "adapter"))
    from safetensors.torch import load_file

    names = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert any(".node_heads.energy." in name for name in names)  # the new head, as `energy`
    assert not any("finetune" in name for name in names) and any("lora_A" in name for name in names)


def test_promotion_export_and_ase_give_the_trials_numbers_through_the_new_head(
    separate, tiny_data, embedded_paths, tmp_path
) -> None:
    workdir, run = separate
    metrics = run.data.metrics
    promoted = plain_shell("sweeper.promote", cwd=workdir, timeout=300)
    assert promoted.returncode == 0, promoted.stderr
    assert "verified" in promoted.stdout  # re-evaluated within 1e-4 of the logged val_ errors
    exported = tmp_path / "model.pt"
    done = plain_shell(
        "sweeper.export", f"models:/{NAME}@champion", "-o", str(exported), cwd=workdir, timeout=300
    )
    assert done.returncode == 0, done.stderr
    energy, force = _ase_errors(exported, read(tiny_data["validation"], ":"))
    assert energy == pytest.approx(metrics["val_energy_mae_meV_per_atom"], rel=1e-4)
    assert force == pytest.approx(metrics["val_force_mae_meV_per_A"], rel=1e-4)
    # The retained metric is the deployed head's: the same structures through ASE give it.
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    indices = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/original_indices.json"))
    frames = read(embedded_paths["original"], ":")
    _, retained_force = _ase_errors(exported, [frames[i] for i in indices["retained"]])
    assert retained_force == pytest.approx(metrics["retained_force_mae_meV_per_A"], rel=1e-4)
    assert retained_force != pytest.approx(metrics["replay_head_retained_force_mae_meV_per_A"], rel=1e-3)
