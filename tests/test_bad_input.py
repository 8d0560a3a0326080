"""Bad input: a one-line error naming the key, file or flag, before any work, and no run.

One table (`_bad_cases`) of what users get wrong: config values, structure files (missing,
empty, binary, truncated, without labels, NaN or infinite labels, no cell for stress),
units, checkpoints (another architecture, not one, truncated), devices, servers, and the
flags and model URIs of `python -m sweeper.promote` and `sweeper.export`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read, write
from helpers.shell import plain_shell
from helpers.sweeps import compose_config, run_cli, tiny_overrides
from helpers.tracking import mlflow_client, runs

from sweeper import embedded, trial
from sweeper.config import ConfigError


def _file(tmp_path: Path, name: str, frames) -> Path:
    path = tmp_path / name
    write(path, frames, format="extxyz")
    return path


def _without(tiny_data: dict[str, Path], tmp_path: Path, what: str) -> Path:
    frames = read(tiny_data["train"], index=":")
    for atoms in frames:
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = None
        if what == "energy":
            atoms.arrays["forces"] = forces
        else:
            atoms.info["energy"] = energy
    return _file(tmp_path, f"no_{what}.xyz", frames)


def _labelled(tiny_data: dict[str, Path], tmp_path: Path, name: str, key: str, value: float) -> Path:
    """The tiny training file with one label of structure 2 replaced by `value`."""
    frames = read(tiny_data["train"], index=":")
    for atoms in frames:
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = None
        atoms.info["energy"], atoms.arrays["forces"] = energy, forces
    if key == "forces":
        frames[2].arrays["forces"][0, 1] = value
    else:
        frames[2].info[key] = value
    return _file(tmp_path, name, frames)


def _bad_cases(tiny_data: dict[str, Path], tmp_path: Path) -> dict[str, tuple[str, list[str], str]]:
    """case -> (tool, arguments, text the one-line error must contain). A `trial` takes
    overrides of a trial on tiny data; `promote` and `export` take their flags."""
    gold = read(tiny_data["train"], index=":2")
    for atoms in gold:
        atoms.numbers[:] = 79  # Au: the copper base model has never seen it
    not_pet = tmp_path / "not_pet.ckpt"
    torch.save({"architecture_name": "soap_bpnn", "model_data": {}}, not_pet)
    text_file = tmp_path / "not_a_checkpoint.ckpt"
    text_file.write_text("hello")
    truncated_checkpoint = tmp_path / "truncated.ckpt"
    truncated_checkpoint.write_bytes(embedded.base_model_path().read_bytes()[:20000])
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\nan xyz file\n")
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    binary = tmp_path / "binary.xyz"
    binary.write_bytes(bytes(range(256)) * 8)
    truncated = tmp_path / "truncated.xyz"
    truncated.write_text("".join(Path(tiny_data["train"]).read_text().splitlines(keepends=True)[:20]))
    no_cell = read(tiny_data["train"], index=":")
    for atoms in no_cell:
        atoms.info["stress"] = np.zeros((3, 3))  # labelled, but one structure has no cell
    no_cell[1].set_cell(np.zeros((3, 3)))
    no_cell[1].pbc = False
    not_an_adapter = tmp_path / "not_an_adapter"
    not_an_adapter.mkdir()
    nan_energy = _labelled(tiny_data, tmp_path, "nan_energy.xyz", "energy", float("nan"))
    inf_forces = _labelled(tiny_data, tmp_path, "inf_forces.xyz", "forces", float("inf"))
    cuda = "cuda:99" if torch.cuda.is_available() else "cuda"
    return {
        "missing train file": ("trial", [f"data.finetune.train={tmp_path}/nope.xyz"], "data.finetune.train"),
        "missing original file": ("trial", [f"data.original.path={tmp_path}/nope.xyz"], "data.original.path"),
        "unreadable file": ("trial", [f"data.finetune.validation={garbage}"], "data.finetune.validation"),
        "empty file": ("trial", [f"data.finetune.validation={empty}"], "data.finetune.validation"),
        "binary file": ("trial", [f"data.finetune.test={binary}"], "data.finetune.test"),
        "truncated file": ("trial", [f"data.finetune.train={truncated}"], "data.finetune.train"),
        "truncated original file": (  # the default replay counts its structures first
            "trial",
            [f"data.original.path={truncated}", "data.original.max_structures=1"],
            "data.original.path",
        ),
        "no energy key": (
            "trial",
            [f"data.finetune.train={_without(tiny_data, tmp_path, 'energy')}", "data.finetune.energy_key=E"],
            "'E'",
        ),
        "no forces key": (
            "trial",
            [f"data.finetune.train={_without(tiny_data, tmp_path, 'forces')}"],
            "forces",
        ),
        "NaN energy": ("trial", [f"data.finetune.train={nan_energy}"], "structure 2: its energy"),
        "infinite forces": ("trial", [f"data.finetune.train={inf_forces}"], "structure 2: its forces"),
        "stress without a cell": (
            "trial",
            [f"data.finetune.train={_file(tmp_path, 'no_cell.xyz', no_cell)}", "data.finetune.stress=true"],
            "structure 1 has no cell",
        ),
        "stress and virial": ("trial", ["data.finetune.stress=true", "data.finetune.virial=true"], "virial"),
        "unknown unit": ("trial", ["data.finetune.energy_unit=eVs"], "data.finetune.energy_unit"),
        "units other than the base's": (
            "trial",
            ["data.finetune.energy_unit=hartree"],
            "base model's energy",
        ),
        "unknown species": ("trial", [f"data.finetune.test={_file(tmp_path, 'gold.xyz', gold)}"], "[79]"),
        "target modules match nothing": (
            "trial",
            ["lora.target_modules=[query_linear]"],
            "lora.target_modules",
        ),
        "not a PET checkpoint": ("trial", [f"model.checkpoint={not_pet}"], "not a PET checkpoint"),
        "not a checkpoint at all": ("trial", [f"model.checkpoint={text_file}"], "model.checkpoint"),
        "truncated checkpoint": ("trial", [f"model.checkpoint={truncated_checkpoint}"], "model.checkpoint"),
        "missing checkpoint": ("trial", [f"model.checkpoint={tmp_path}/nope.ckpt"], "model.checkpoint"),
        "checkpoint not the pinned one": ("trial", [f"model.sha256={'0' * 64}"], "model.sha256 asks for"),
        "pin not a sha256": ("trial", ["model.sha256=abc"], "model.sha256"),
        "unknown device": ("trial", ["device=tpu"], "device"),
        "cuda without a GPU": ("trial", [f"device={cuda}"], "device"),
        "GPU memory share out of range": ("trial", ["gpu_memory_fraction=1.5"], "gpu_memory_fraction"),
        "rank < 1": ("trial", ["lora.rank=0"], "lora.rank"),
        "alpha <= 0": ("trial", ["lora.alpha=0"], "lora.alpha"),
        "lr <= 0": ("trial", ["train.lr=0"], "train.lr"),
        "epochs < 1": ("trial", ["train.epochs=0"], "train.epochs"),
        "batch size < 1": ("trial", ["train.batch_size=0"], "train.batch_size"),
        "batch larger than the data": ("trial", ["train.batch_size=9"], "train.batch_size"),
        "negative loss weight": ("trial", ["train.loss_weights.forces=-1"], "train.loss_weights.forces"),
        "metric the data lacks": (
            "trial",
            ["objective.metric=val_stress_mae_meV_per_A3"],
            "objective.metric",
        ),
        "replay without room": (
            "trial",
            ["finetune.replay.structures=8", "data.original.max_structures=2"],
            "finetune.replay.structures",
        ),
        "replay pool smaller than a draw": (
            "trial",
            ["finetune.replay.structures=4", "finetune.replay.pool=2"],
            "finetune.replay.pool",
        ),
        "replay pool without room": (
            "trial",
            ["finetune.replay.structures=4", "finetune.replay.pool=5", "data.original.max_structures=2"],
            "finetune.replay.pool",
        ),
        "replay batch of none": ("trial", ["finetune.replay.batch_size=0"], "finetune.replay.batch_size"),
        "replay smaller than its batch": (
            "trial",
            ["finetune.replay.structures=2", "finetune.replay.batch_size=4"],
            "finetune.replay.structures",
        ),
        "negative anchor weight": ("trial", ["finetune.anchor.weight=-0.1"], "finetune.anchor.weight"),
        "separate head without replay": ("trial", ["finetune.replay.head=separate"], "finetune.replay.head"),
        "epochs scored by a test metric": (
            "trial",
            ["train.select_epoch_by=objective", "objective.metric=test_force_mae_meV_per_A"],
            "train.select_epoch_by",
        ),
        "unreachable tracking server": ("trial", ["tracking.uri=http://127.0.0.1:9"], "tracking.uri"),
        "promote: unknown model": ("promote", ["--name", "nope"], "no registered model 'nope'"),
        "promote: negative tolerance": ("promote", ["--tolerance", "-1"], "--tolerance"),
        "promote: no store there": (
            "promote",
            ["--tracking-uri", f"sqlite:///{tmp_path}/none.db"],
            "no such database",
        ),
        "promote: unknown flag": ("promote", ["--champion"], "unrecognized arguments"),
        "promote: unknown device": ("promote", ["--device", "tpu"], "--device"),
        "promote: cuda without a GPU": ("promote", ["--device", cuda], "--device"),
        "export: unknown model": (
            "export",
            ["models:/nope@champion", "-o", "m.pt"],
            "no registered model 'nope'",
        ),
        "export: unknown version": ("export", ["models:/nope/3", "-o", "m.pt"], "no registered model"),
        "export: not an adapter folder": (
            "export",
            [str(not_an_adapter), "-o", "m.pt"],
            "not an adapter folder",
        ),
        "export: no output": ("export", ["models:/x@champion"], "-o/--output"),
    }


CASES = [
    "missing train file", "missing original file", "unreadable file", "empty file", "binary file",
    "truncated file", "truncated original file", "no energy key", "no forces key", "NaN energy",
    "infinite forces",
    "stress without a cell", "stress and virial", "unknown unit", "units other than the base's",
    "unknown species", "target modules match nothing", "not a PET checkpoint", "not a checkpoint at all",
    "truncated checkpoint", "missing checkpoint", "checkpoint not the pinned one", "pin not a sha256",
    "unknown device", "cuda without a GPU", "GPU memory share out of range", "rank < 1",
    "alpha <= 0", "lr <= 0", "epochs < 1", "batch size < 1", "batch larger than the data",
    "negative loss weight", "metric the data lacks", "replay without room", "replay pool smaller than a draw",
    "replay pool without room", "replay batch of none", "replay smaller than its batch",
    "negative anchor weight", "epochs scored by a test metric",
    "separate head without replay",
    "unreachable tracking server",
    "promote: unknown model", "promote: negative tolerance", "promote: no store there",
    "promote: unknown flag", "promote: unknown device", "promote: cuda without a GPU",
    "export: unknown model", "export: unknown version", "export: not an adapter folder", "export: no output",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_before_any_work_with_one_line(case, tiny_data, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tool, arguments, expected = _bad_cases(tiny_data, tmp_path)[case]
    if tool != "trial":  # the command-line tools, against an empty MLflow store in this folder
        mlflow_client(tmp_path).search_experiments()
        done = plain_shell(f"sweeper.{tool}", *arguments, cwd=tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert expected in lines[-1] and "Traceback" not in done.stderr, done.stderr
        return
    cfg = compose_config(tiny_overrides(tiny_data, tmp_path) + arguments)
    started = []
    with pytest.raises(ConfigError) as raised:
        trial.run(cfg, tmp_path / "out", on_epoch=lambda *_: started.append(1))
    message = str(raised.value)
    assert expected in message
    assert "\n" not in message
    assert not started, "training started despite bad input"
    assert runs(tmp_path) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.rank=0"], "lora.rank"),
        (["lora.rnak=4"], "lora.rnak"),
        (["data.finetune.train=/no/such/file.xyz"], "/no/such/file.xyz"),
    ],
)
def test_cli_exits_nonzero_with_one_line(overrides, expected, tiny_data, tmp_path) -> None:
    done = run_cli(tiny_overrides(tiny_data, tmp_path) + overrides, cwd=tmp_path)
    assert done.returncode != 0
    error_lines = [line for line in done.stderr.splitlines() if expected in line]
    assert error_lines, done.stderr
    assert runs(tmp_path) == []


def test_unknown_species_message_names_the_file(tiny_data, tmp_path) -> None:
    atoms = Atoms("Au2", positions=[[0, 0, 0], [0, 0, 2.5]], cell=[8, 8, 8], pbc=True)
    atoms.info["energy"] = 0.0
    atoms.arrays["forces"] = atoms.positions * 0
    path = _file(tmp_path, "au.xyz", [atoms])
    cfg = compose_config(
        tiny_overrides(tiny_data, tmp_path) + [f"data.finetune.train={path}", "train.batch_size=1"]
    )
    with pytest.raises(ConfigError, match="^data.finetune.train: atomic numbers \\[79\\]"):
        trial.run(cfg, tmp_path / "out")
