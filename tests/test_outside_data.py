"""What users bring, run as they would run it: energy-only molecules in hartree, periodic data
with stress (or virial), a foundation-shaped multi-head base made by the real `mtt train`,
another DFT energy reference, no original set, and a large original file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read, write
from helpers.outside_data import (
    BOHR_IN_ANGSTROM,
    HARTREE_IN_EV,
    SHIFTS_EV,
    foundation_overrides,
    hartree_overrides,
)
from helpers.shell import plain_shell
from helpers.studies import sweep_study
from helpers.sweeps import compose_config, merged, run_cli, tiny_overrides, trial_cli
from helpers.tracking import adapter_folder, mlflow_client, runs
from metatomic_ase import MetatomicCalculator

from sweeper import adapter, data, embedded, files, trial
from sweeper import metatrain as mtt
from sweeper.config import ConfigError

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

# ------------------------------------------------------------ energy-only, in hartree


@pytest.fixture(scope="module")
def hartree_trial(hartree, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hartree-trial")
    done, run = trial_cli(hartree_overrides(hartree, workdir), workdir)
    return workdir, done, run


def test_energy_only_hartree_trial_reports_meV_and_only_what_the_data_has(hartree_trial) -> None:
    workdir, done, run = hartree_trial
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ("val_energy_mae_meV_per_atom", "retained_energy_mae_ratio", "base_energy_rmse_meV_per_atom"):
        assert np.isfinite(metrics[name]) and metrics[name] > 0, name
    assert not [name for name in metrics if "force" in name or "stress" in name or "virial" in name]
    assert not [name for name in metrics if "hartree" in name]
    assert "epoch/val_energy_mae_meV_per_atom" in metrics
    assert "force" not in done.stdout and "retained energy MAE" in done.stdout


def test_hartree_metrics_agree_with_mtt_eval_converted_by_hand(hartree, hartree_trial, tmp_path) -> None:
    """The logged meV/atom against metatrain's own evaluation of the same model, in hartree."""
    workdir, _, run = hartree_trial
    model = adapter.apply(adapter_folder(workdir, run), hartree["base"])
    mtt.export(model, tmp_path / "adapted.pt")  # LoRA in place: exactly the trial's weights
    options = {
        "systems": {"read_from": str(hartree["validation"]), "length_unit": "angstrom"},
        "targets": {"energy": {"key": "dft_energy", "unit": "hartree", "forces": False}},
    }
    (tmp_path / "eval.yaml").write_text(json.dumps(options))
    done = plain_shell("metatrain", "eval", "adapted.pt", "eval.yaml", "-o", "predictions.xyz", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    predicted = read(tmp_path / "predictions.xyz", ":")
    labelled = read(hartree["validation"], ":")
    errors = [
        abs(p.get_potential_energy() - r.info["dft_energy"]) / len(r)  # ASE reads `energy` as a result
        for p, r in zip(predicted, labelled, strict=True)
    ]
    by_hand = 1000 * HARTREE_IN_EV * float(np.mean(errors))
    assert run.data.metrics["val_energy_mae_meV_per_atom"] == pytest.approx(by_hand, rel=1e-6)


def test_hartree_per_epoch_values_are_metatrains_times_the_factor(hartree_trial) -> None:
    """metatrain logs `0.0043 hartree`; MLflow holds the same number in meV under the eV name."""
    workdir, _, run = hartree_trial
    log = (next(workdir.glob("outputs/*/*/trial.log"))).read_text()
    logged = [float(v) for v in re.findall(r"validation energy MAE \(per atom\): +([0-9.]+) hartree", log)]
    history = mlflow_client(workdir).get_metric_history(run.info.run_id, "epoch/val_energy_mae_meV_per_atom")
    ours = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(logged) == len(ours) == 2
    for hartree_value, mev in zip(logged, ours, strict=True):
        assert mev == pytest.approx(hartree_value * 1000 * HARTREE_IN_EV, rel=1e-9)


@pytest.fixture(scope="module")
def hartree_sweep(hartree, tmp_path_factory):
    """Three trials; the median pruner listens to the validation energy MAE every epoch."""
    workdir = tmp_path_factory.mktemp("hartree-sweep")
    arguments = [
        "-m",
        *merged(
            hartree_overrides(hartree, workdir),
            "lora.rank=2,4",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.pruner.n_startup_trials=1",
            "hydra.sweeper.pruner.n_warmup_steps=0",
        ),
    ]
    done = run_cli(arguments, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def test_energy_only_sweep_optimises_and_prunes_on_the_energy(hartree_sweep) -> None:
    workdir, done = hartree_sweep
    study = sweep_study(workdir)
    assert len(study.trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert all(t.intermediate_values for t in study.trials)  # reported every epoch: the pruner hears it
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    for t in complete:
        assert t.value == t.user_attrs["metrics"]["val_energy_mae_meV_per_atom"]
    assert "val_energy_mae_meV_per_atom with retained_energy_mae_ratio <= 1.2" in done.stdout


def test_energy_only_promote_verifies_then_export_and_ase_run(hartree, hartree_sweep) -> None:
    workdir, _ = hartree_sweep
    done = plain_shell("sweeper.promote", cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verified" in done.stdout and "val_energy_mae_meV_per_atom" in done.stdout
    assert "force" not in done.stdout
    exported = plain_shell("sweeper.export", "models:/base-lora@champion", "-o", "model.pt", cwd=workdir)
    assert exported.returncode == 0, exported.stderr[-2000:]
    atoms = read(hartree["validation"], "0")
    atoms.calc = MetatomicCalculator(str(workdir / "model.pt"), device="cpu")
    energy = atoms.get_potential_energy()  # eV: the calculator converts the model's hartree
    assert abs(energy - atoms.info["dft_energy"] * HARTREE_IN_EV) < 2.0 * len(atoms)
    assert atoms.get_forces().shape == (len(atoms), 3)


def test_hartree_and_bohr_forces_and_stress_in_meV_match_the_ase_calculator(atomic_units, tmp_path) -> None:
    """A base trained in hartree and bohr: forces (hartree/bohr) and stress (hartree/bohr³)
    reported in meV/Å and meV/Å³, against metatomic's ASE calculator (eV, Å) and the
    labels converted by hand."""
    overrides = [
        f"model.checkpoint={atomic_units['base']}",
        f"data.finetune.train={atomic_units['train']}",
        f"data.finetune.validation={atomic_units['validation']}",
        "data.finetune.test=null",
        *(
            f"data.{group}.{key}"
            for group in ("finetune", "original")
            for key in ("energy_unit=hartree", "length_unit=bohr", "stress=true")
        ),
        f"data.original.path={atomic_units['original']}",
        "data.original.max_structures=8",
        "train.epochs=1",
        "lora.rank=2",
        "threads=2",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    done, run = trial_cli(overrides, tmp_path)
    model = adapter.apply(adapter_folder(tmp_path, run), atomic_units["base"])
    calculator = MetatomicCalculator(mtt.export(model), device="cpu")
    energy, force, stress = [], [], []
    for atoms in read(atomic_units["validation"], ":"):
        labels = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        atoms.set_cell(atoms.cell * BOHR_IN_ANGSTROM, scale_atoms=True)  # the calculator wants Å
        atoms.calc = calculator
        energy.append(abs(atoms.get_potential_energy() - labels[0] * HARTREE_IN_EV) / len(atoms))
        force.append(np.abs(atoms.get_forces() - labels[1] * HARTREE_IN_EV / BOHR_IN_ANGSTROM).ravel())
        stress.append(
            np.abs(atoms.get_stress(voigt=False) - labels[2] * HARTREE_IN_EV / BOHR_IN_ANGSTROM**3).ravel()
        )
    metrics = run.data.metrics
    assert metrics["val_energy_mae_meV_per_atom"] == pytest.approx(1000 * np.mean(energy), rel=1e-4)
    assert metrics["val_force_mae_meV_per_A"] == pytest.approx(
        1000 * np.mean(np.concatenate(force)), rel=1e-4
    )
    assert metrics["val_stress_mae_meV_per_A3"] == pytest.approx(
        1000 * np.mean(np.concatenate(stress)), rel=1e-4
    )
    assert metrics["retained_force_mae_ratio"] > 0 and "epoch/val_force_mae_meV_per_A" in metrics


# ------------------------------------------------------------- periodic data with stress


def _stress_overrides(tiny_data, stressed, workdir: Path, *extra: str) -> list[str]:
    return merged(
        tiny_overrides(tiny_data, workdir),
        f"data.finetune.train={stressed['train']}",
        f"data.finetune.validation={stressed['validation']}",
        "data.finetune.test=null",
        "data.original.path=null",
        "train.epochs=2",
        *extra,
    )


@pytest.fixture(scope="module")
def stress_trial(tiny_data, stressed, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stress")
    overrides = _stress_overrides(
        tiny_data, stressed, workdir, "data.finetune.stress=true", "train.loss_weights.stress=0.5"
    )
    done, run = trial_cli(overrides, workdir)
    return workdir, done, run


def test_stress_is_trained_with_its_loss_weight_and_reported_in_meV_per_A3(stress_trial) -> None:
    workdir, done, run = stress_trial
    metrics = run.data.metrics
    for name in (
        "val_stress_mae_meV_per_A3",
        "val_stress_rmse_meV_per_A3",
        "epoch/val_virial_mae_meV_per_atom",
    ):
        assert np.isfinite(metrics[name]) and metrics[name] > 0, name
    assert "stress MAE" in done.stdout and "no original set" in done.stdout
    assert not [name for name in metrics if name.startswith(("retained_", "base_"))]
    log = next(workdir.glob("outputs/*/*/trial.log")).read_text()
    assert re.search(r"energy::strain: \{'type': 'mse', 'weight': 0\.5", log), (
        "weight not in metatrain's loss"
    )
    assert run.data.params["train.loss_weights.stress"] == "0.5"


def test_stress_errors_match_the_ase_calculator(stress_trial, stressed) -> None:
    """Recomputed through metatomic's ASE calculator (stress in eV/Å³ from the exported model)."""
    workdir, _, run = stress_trial
    model = adapter.apply(adapter_folder(workdir, run), embedded.base_model_path())
    calculator = MetatomicCalculator(mtt.export(model), device="cpu")
    errors = []
    for atoms in read(stressed["validation"], ":"):
        reference = atoms.get_stress(voigt=False)  # the label: ASE reads `stress` as a result
        atoms.calc = calculator
        errors.append(np.abs(atoms.get_stress(voigt=False) - reference).ravel())
    by_hand = 1000 * float(np.mean(np.concatenate(errors)))
    assert run.data.metrics["val_stress_mae_meV_per_A3"] == pytest.approx(by_hand, rel=1e-4)


def test_virial_labels_give_the_same_stress_errors(stress_trial, tiny_data, stressed, tmp_path) -> None:
    _, _, stress_run = stress_trial
    overrides = _stress_overrides(
        tiny_data, stressed, tmp_path, "data.finetune.virial=true", "train.loss_weights.stress=0.5"
    )
    done, run = trial_cli(overrides, tmp_path)
    for name in ("val_stress_mae_meV_per_A3", "val_force_mae_meV_per_A", "val_energy_mae_meV_per_atom"):
        assert run.data.metrics[name] == pytest.approx(stress_run.data.metrics[name], rel=1e-6), name


def test_stress_and_virial_together_or_a_structure_without_cell_are_one_line_errors(
    tiny_data, stressed, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    both = compose_config(
        _stress_overrides(
            tiny_data, stressed, tmp_path, "data.finetune.stress=true", "data.finetune.virial=true"
        )
    )
    with pytest.raises(ConfigError, match=r"^data.finetune.stress and data.finetune.virial cannot both"):
        trial.run(both, tmp_path / "out")
    frames = read(stressed["train"], ":")
    frames[3].set_cell(np.zeros((3, 3)))
    frames[3].pbc = False
    write(tmp_path / "no_cell.xyz", frames, format="extxyz")
    cfg = compose_config(
        _stress_overrides(
            tiny_data,
            stressed,
            tmp_path,
            "data.finetune.stress=true",
            f"data.finetune.train={tmp_path / 'no_cell.xyz'}",
        )
    )
    with pytest.raises(ConfigError) as raised:
        trial.run(cfg, tmp_path / "out")
    assert str(raised.value).startswith(
        f"data.finetune.train: {tmp_path / 'no_cell.xyz'} structure 3 has no cell"
    )
    assert runs(tmp_path) == []


# ------------------------------------------------------------ a foundation-shaped base


@pytest.fixture(scope="module")
def foundation_trial(foundation, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("foundation-trial")
    done, run = trial_cli(foundation_overrides(foundation, workdir), workdir)
    return workdir, done, run


def test_lora_on_a_multihead_base_keeps_energy_and_says_what_it_dropped(foundation, foundation_trial) -> None:
    workdir, done, run = foundation_trial
    base = mtt.load_checkpoint(foundation["base"])
    assert sorted(mtt.model_targets(base)) == ["energy", "non_conservative_force"]
    assert len(mtt.model_atomic_types(base)) == 3
    assert run.data.tags["base_targets"] == "energy,non_conservative_force"
    assert run.data.tags["targets"] == "energy"
    config = adapter.read_config(adapter_folder(workdir, run))
    assert config["targets"] == ["energy"] and config["base_targets"] == ["energy", "non_conservative_force"]
    assert "non_conservative_force dropped" in done.stdout
    assert "val_stress_mae_meV_per_A3" in run.data.metrics and "retained_stress_mae_ratio" in run.data.metrics
    reapplied = adapter.apply(adapter_folder(workdir, run), foundation["base"])
    assert mtt.model_targets(reapplied) == ["energy"]


def test_heads_fine_tuning_keeps_every_head_of_the_base(foundation, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(
        merged(foundation_overrides(foundation, tmp_path), "finetune=heads", "train.epochs=1")
    )
    result = trial.run(cfg, tmp_path / "out")
    assert sorted(result.targets) == ["energy", "non_conservative_force"]


def test_multihead_sweep_promote_export_and_ase(foundation, tmp_path) -> None:
    arguments = [
        "-m",
        *merged(
            foundation_overrides(foundation, tmp_path),
            "lora.rank=2,4",
            "hydra.sweeper.n_trials=2",
            "hydra/sweeper/pruner=none",
            "objective.retained_tolerance=100",
        ),
    ]
    done = run_cli(arguments, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    promoted = plain_shell("sweeper.promote", cwd=tmp_path)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    assert "verified" in promoted.stdout and "val_stress_mae_meV_per_A3" in promoted.stdout
    exported = plain_shell("sweeper.export", "models:/base-lora@champion", "-o", "model.pt", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    from metatomic.torch import load_atomistic_model

    outputs = load_atomistic_model(str(tmp_path / "model.pt")).capabilities().outputs
    assert "energy" in outputs and "non_conservative_force" not in outputs, list(outputs)
    atoms = read(foundation["validation"], "0")
    atoms.calc = MetatomicCalculator(str(tmp_path / "model.pt"), device="cpu")
    assert atoms.get_forces().shape == (len(atoms), 3) and atoms.get_stress().shape == (6,)


# ------------------------------------------------------------ another energy reference


def test_refit_absorbs_per_element_shifts_and_measures_retention_in_the_base_reference(
    foundation, tmp_path, monkeypatch
) -> None:
    def run(name: str, shifted: bool, reference: str) -> trial.TrialResult:
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        cfg = compose_config(
            [
                *foundation_overrides(foundation, folder, shifted),
                f"data.finetune.energy_reference={reference}",
                "finetune.replay.structures=0",  # the energy reference alone
            ]
        )
        return trial.run(cfg, folder / "out")

    plain, refit, shifted = (
        run("plain", False, "base"),
        run("refit", False, "refit"),
        run("shifted", True, "refit"),
    )
    offsets = {name: value for name, value in shifted.metrics.items() if name.startswith("energy_offset_")}
    for symbol, z in (("Cu", 29), ("Ag", 47), ("Au", 79)):
        name = f"energy_offset_{symbol}_meV"
        assert offsets[name] - refit.metrics[name] == pytest.approx(1000 * SHIFTS_EV[z], abs=1e-3)
    # The same data in another reference: the same fine-tuning and the same retained errors.
    for name, value in refit.metrics.items():
        if name.startswith(("val_", "retained_", "base_")):
            assert shifted.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # ... within 5 % of the run on the unshifted data in the base's own reference.
    val = "val_energy_mae_meV_per_atom"
    assert shifted.metrics[val] == pytest.approx(plain.metrics[val], rel=0.05)
    # The offsets travel with the adapter: re-applied, it reproduces the shifted errors.
    stored = adapter.energy_offsets(adapter.read_config(shifted.adapter_dir))
    assert sorted(stored) == [29, 47, 79]
    model = adapter.apply(shifted.adapter_dir, foundation["base"])
    labels = data.labels_of(compose_config(foundation_overrides(foundation, tmp_path, True)).data.finetune)
    dataset, _ = mtt.read_dataset(foundation["shifted_validation"], labels)
    from sweeper import evaluate

    torch.set_num_threads(2)
    again = evaluate.errors(model, dataset, labels, torch.device("cpu"))
    assert again["energy_mae_meV_per_atom"] == pytest.approx(shifted.metrics[val], rel=1e-9)


# ------------------------------------------------------------------ no original set


def test_a_sweep_without_an_original_set_optimises_the_metric_alone(tiny_data, tmp_path) -> None:
    arguments = [
        "-m",
        *merged(
            tiny_overrides(tiny_data, tmp_path),
            "data.original.path=null",
            "train.epochs=2",
            "lora.rank=2,4",
            "hydra.sweeper.n_trials=2",
        ),
    ]
    done = run_cli(arguments, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "alone (no original set" in done.stdout
    client = mlflow_client(tmp_path)
    study = sweep_study(tmp_path)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    (parent,) = [r for r in runs(tmp_path) if r.data.tags.get("role") == "study"]
    assert "alone" in parent.data.tags["mlflow.note.content"]
    versions = client.search_model_versions()
    assert {v.run_id for v in versions} == {t.user_attrs["run_id"] for t in complete}  # all feasible
    assert {v.tags["retained_metric"] for v in versions} == {"none"}
    promoted = plain_shell("sweeper.promote", cwd=tmp_path)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    assert "policy: lowest val_force_mae_meV_per_A, study pet-lora\n" in promoted.stdout  # no retained bound


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["data.finetune.forces=false", "objective.metric=val_force_mae_meV_per_A"], "objective.metric"),
        (["data.original.path=null", "objective=pareto"], "objective=pareto needs a retained metric"),
        (  # the pruner's check (the kept epoch's: tests/test_bad_input.py)
            ["objective.metric=test_force_mae_meV_per_A", "train.select_epoch_by=mae_prod"],
            "is not reported per epoch",
        ),
        (
            ["data.original.path=null", "objective.retained_metric=retained_force_mae_ratio"],
            "retained_metric",
        ),
    ],
)
def test_an_objective_the_data_cannot_produce_stops_the_sweep_before_the_study(
    arguments, expected, tiny_data, tmp_path
) -> None:
    done = run_cli(["-m", *merged(tiny_overrides(tiny_data, tmp_path), *arguments)], cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "pet-lora.db").exists() and runs(tmp_path) == []


# ------------------------------------------------------------- a large original file


def test_a_large_original_file_is_cut_down_before_it_is_parsed(
    tiny_data, embedded_paths, tmp_path, monkeypatch
):
    """300 structures, 8 used: only those 8 are parsed, byte for byte the file's own frames,
    and the numbers equal those of reading the whole file (here as an ASE trajectory)."""
    frames = read(embedded_paths["original"], ":") * 2
    frames = frames[:300]
    large = tmp_path / "large.xyz"
    write(large, frames, format="extxyz")
    write(tmp_path / "large.traj", frames)  # another format: parsed whole, then subsampled
    cfg = compose_config(
        merged(
            tiny_overrides(tiny_data, tmp_path),
            f"data.original.path={large}",
            "data.original.max_structures=8",
            "train.epochs=1",
        )
    )
    path, indices = data.original_file(cfg.data.original)
    assert path != large and len(indices) == 8 and len(read(path, ":")) == 8
    text = large.read_text().splitlines(keepends=True)
    frame = 32 + 2  # lines per structure: the atom count, the comment and 32 atoms
    expected = "".join("".join(text[i * frame : (i + 1) * frame]) for i in indices)
    assert path.read_text() == expected
    monkeypatch.chdir(tmp_path)
    first = trial.run(cfg, tmp_path / "xyz")
    whole = compose_config(
        merged(
            tiny_overrides(tiny_data, tmp_path),
            f"data.original.path={tmp_path / 'large.traj'}",
            "data.original.max_structures=8",
            "train.epochs=1",
        )
    )
    second = trial.run(whole, tmp_path / "traj")
    for name in (
        "base_force_mae_meV_per_A",
        "retained_energy_mae_meV_per_atom",
        "retained_force_rmse_meV_per_A",
    ):
        assert first.metrics[name] == second.metrics[name], name
    run = mlflow_client(tmp_path).get_run(first.run_id)
    assert run.data.tags["data_original_sha256"] == files.file_sha256(large)
