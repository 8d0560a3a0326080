"""Bad input: a one-line error naming the key or file, before training, and no run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ase import Atoms
from ase.io import read, write
from conftest import compose_config, run_cli, runs, tiny_overrides

from sweeper import trial
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


def _bad_cases(tiny_data: dict[str, Path], tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (overrides, text the error must contain)."""
    gold = read(tiny_data["train"], index=":2")
    for atoms in gold:
        atoms.numbers[:] = 79  # Au: the copper base model has never seen it
    not_pet = tmp_path / "not_pet.ckpt"
    torch.save({"architecture_name": "soap_bpnn", "model_data": {}}, not_pet)
    text_file = tmp_path / "not_a_checkpoint.ckpt"
    text_file.write_text("hello")
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\nan xyz file\n")
    return {
        "missing train file": ([f"data.finetune.train={tmp_path}/nope.xyz"], "data.finetune.train"),
        "missing original file": ([f"data.original.path={tmp_path}/nope.xyz"], "data.original.path"),
        "unreadable file": ([f"data.finetune.validation={garbage}"], "data.finetune.validation"),
        "no energy key": (
            [f"data.finetune.train={_without(tiny_data, tmp_path, 'energy')}", "data.finetune.energy_key=E"],
            "'E'",
        ),
        "no forces key": ([f"data.finetune.train={_without(tiny_data, tmp_path, 'forces')}"], "forces"),
        "unknown species": ([f"data.finetune.test={_file(tmp_path, 'gold.xyz', gold)}"], "[79]"),
        "target modules match nothing": (["lora.target_modules=[query_linear]"], "lora.target_modules"),
        "not a PET checkpoint": ([f"model.checkpoint={not_pet}"], "not a PET checkpoint"),
        "not a checkpoint at all": ([f"model.checkpoint={text_file}"], "model.checkpoint"),
        "missing checkpoint": ([f"model.checkpoint={tmp_path}/nope.ckpt"], "model.checkpoint"),
        "unknown device": (["device=tpu"], "device"),
        "cuda without a GPU": ([f"device={'cuda:99' if torch.cuda.is_available() else 'cuda'}"], "device"),
        "rank < 1": (["lora.rank=0"], "lora.rank"),
        "alpha <= 0": (["lora.alpha=0"], "lora.alpha"),
        "lr <= 0": (["train.lr=0"], "train.lr"),
        "epochs < 1": (["train.epochs=0"], "train.epochs"),
        "batch size < 1": (["train.batch_size=0"], "train.batch_size"),
        "unreachable tracking server": (["tracking.uri=http://127.0.0.1:9"], "tracking.uri"),
    }


CASES = [
    "missing train file",
    "missing original file",
    "unreadable file",
    "no energy key",
    "no forces key",
    "unknown species",
    "target modules match nothing",
    "not a PET checkpoint",
    "not a checkpoint at all",
    "missing checkpoint",
    "unknown device",
    "cuda without a GPU",
    "rank < 1",
    "alpha <= 0",
    "lr <= 0",
    "epochs < 1",
    "batch size < 1",
    "unreachable tracking server",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_before_training_with_no_run(case, tiny_data, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    overrides, expected = _bad_cases(tiny_data, tmp_path)[case]
    cfg = compose_config(tiny_overrides(tiny_data, tmp_path) + overrides)
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
    cfg = compose_config(tiny_overrides(tiny_data, tmp_path) + [f"data.finetune.train={path}"])
    with pytest.raises(ConfigError, match="^data.finetune.train: atomic numbers \\[79\\]"):
        trial.run(cfg, tmp_path / "out")
