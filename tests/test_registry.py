"""Registry, promotion and use: a real tiny sweep, `python -m sweeper.promote`, export and ASE."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import torch
from ase.io import read
from helpers.browser import chromium, needs_chromium
from helpers.shell import plain_shell
from helpers.sweeps import sweep_cli
from helpers.tracking import mlflow_client, serve_mlflow
from mlflow.tracking import MlflowClient
from selenium.webdriver.support.ui import WebDriverWait

from sweeper import adapter
from sweeper import metatrain as mtt
from sweeper.registry import models

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

NAME = "base_pet_cu-lora"  # derived from the embedded base checkpoint's file name
METRIC = "val_force_mae_meV_per_A"
TOLERANCE = 100  # the study's objective.retained_tolerance: every trial is registered


def promote(workdir: Path, *arguments: str) -> subprocess.CompletedProcess:
    return plain_shell("sweeper.promote", *arguments, cwd=workdir, timeout=300)  # conf/'s sqlite:///mlflow.db


@pytest.fixture(scope="module")
def swept(tiny_data, tmp_path_factory) -> Path:
    """Three distinct, feasible trials (a grid over the learning rate)."""
    workdir = tmp_path_factory.mktemp("registry")
    done = sweep_cli(
        tiny_data, workdir, "hydra/sweeper/sampler=grid", "lora.rank=2", "lora.alpha=16",
        "train.lr=1e-4,1e-3,5e-3", f"objective.retained_tolerance={TOLERANCE}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.fixture
def client(swept) -> Iterator[MlflowClient]:
    uri = f"sqlite:///{swept / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # for the in-process models API, as a user's script would
    yield MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(before)


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}


def winner(client: MlflowClient, metric: str, tolerance: float = TOLERANCE) -> str:
    """The version the default policy must pick, from the runs' own metrics (not the tags):
    the lowest `metric` among retained force-MAE ratios <= 1 + the study's tolerance."""
    metrics = {v.version: client.get_run(v.run_id).data.metrics for v in client.search_model_versions()}
    eligible = {
        version: m for version, m in metrics.items() if m["retained_force_mae_ratio"] <= 1 + tolerance
    }
    return str(min(eligible, key=lambda version: eligible[version][metric]))


def adapter_file(client: MlflowClient, version: str) -> Path:
    model_id = client.get_model_version(NAME, version).source.removeprefix("models:/")
    return Path(urlparse(client.get_logged_model(model_id).artifact_location).path) / adapter.WEIGHTS_FILE


def test_every_finished_feasible_trial_is_a_tagged_version(client) -> None:
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert len(versions) == 3
    for version in versions:
        run = client.get_run(version.run_id)
        tags = version.tags
        assert tags["study_name"] == "pet-lora" and tags["trial_number"] == run.data.tags["trial_number"]
        assert float(tags[METRIC]) == run.data.metrics[METRIC]
        assert float(tags["retained_force_mae_ratio"]) == run.data.metrics["retained_force_mae_ratio"]
        assert tags["base_checkpoint_sha256"] == run.data.tags["base_checkpoint_sha256"]
        assert tags["lora.rank"] == "2" and float(tags["train.lr"]) == float(run.data.params["train.lr"])
        logged = Path(client.download_artifacts(run.info.run_id, "adapter"))
        assert tags["adapter_sha256"] == adapter.digest(logged)
        assert run.data.tags["registered_version"] == str(version.version)


def test_promote_ranks_verifies_and_moves_champion_then_rolls_back(swept, client) -> None:
    dry = promote(swept, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would verify and promote" in dry.stdout and "champion" not in aliases(client)

    done = promote(swept)
    assert done.returncode == 0, done.stderr
    assert (
        f"policy: lowest {METRIC} with retained_force_mae_ratio <= {1 + TOLERANCE}" in done.stdout
    )  # the study's
    best = winner(client, METRIC)
    assert aliases(client) == {"champion": best}
    assert "verified" in done.stdout and f"version {best} is champion" in done.stdout
    record = client.get_model_version(NAME, best).tags
    assert record["promoted_from_version"] == "none" and METRIC in record["promotion_policy"]

    # Another policy picks another version: it becomes champion, the first one previous.
    other_metric = next(
        m
        for m in ("retained_force_mae_ratio", "val_energy_mae_meV_per_atom", "val_force_rmse_meV_per_A")
        if winner(client, m) != best
    )
    other = winner(client, other_metric)
    again = promote(swept, "--metric", other_metric)
    assert again.returncode == 0, again.stderr
    assert aliases(client) == {"champion": other, "previous": best}
    assert client.get_model_version(NAME, other).tags["promoted_from_version"] == best

    back = promote(swept, "--rollback")
    assert back.returncode == 0, back.stderr
    assert aliases(client) == {"champion": best, "previous": other}
    assert client.get_model_version(NAME, best).tags["promotion_policy"] == "rollback"


def test_tampered_adapter_or_tag_blocks_promotion(swept, client) -> None:
    before = aliases(client)
    target = winner(client, "val_energy_rmse_meV_per_atom")
    weights = adapter_file(client, target)
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-4] + bytes(4))  # four bytes of one tensor zeroed
        done = promote(swept, "--metric", "val_energy_rmse_meV_per_atom")
        assert done.returncode == 1
        assert "adapter sha256" in done.stderr and "tampered" in done.stderr
        assert aliases(client) == before
    finally:
        weights.write_bytes(original)

    tag = client.get_model_version(NAME, target).tags["adapter_sha256"]
    try:
        client.set_model_version_tag(NAME, target, "adapter_sha256", "0" * 64)
        done = promote(swept, "--metric", "val_energy_rmse_meV_per_atom")
        assert done.returncode == 1 and "adapter_sha256 tag" in done.stderr
        assert aliases(client) == before
    finally:
        client.set_model_version_tag(NAME, target, "adapter_sha256", tag)


def test_missing_artifacts_and_a_foreign_base_block_promotion(swept, client, tmp_path) -> None:
    before = aliases(client)
    target = winner(client, METRIC)
    folder = adapter_file(client, target).parent
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    try:
        done = promote(swept)
        assert done.returncode == 1 and "not promoted" in done.stderr
    finally:
        shutil.move(moved, folder)
    foreign = tmp_path / "other.ckpt"
    foreign.write_bytes(b"not the base model")
    done = promote(swept, "--base-checkpoint", str(foreign))
    assert done.returncode == 1 and str(foreign) in done.stderr and "sha256" in done.stderr
    assert aliases(client) == before


def test_bad_names_and_an_empty_registry_are_clear_errors(swept, client, tmp_path) -> None:
    done = promote(swept, "--name", "no-such-model")
    assert done.returncode == 2 and "'no-such-model'" in done.stderr and NAME in done.stderr
    with pytest.raises(models.ModelError, match="no alias 'gold'"):
        models.load(f"models:/{NAME}@gold")
    with pytest.raises(models.ModelError, match="no registered model 'nope'"):
        models.load("models:/nope@champion")
    mlflow_client(tmp_path).search_experiments()  # an empty store
    empty = promote(tmp_path)
    assert empty.returncode == 2 and "registry is empty" in empty.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    nowhere = promote(elsewhere)  # not where the sweep ran: no mlflow.db is created by mistake
    assert nowhere.returncode == 2 and "no such database" in nowhere.stderr
    assert not (elsewhere / "mlflow.db").exists()


def test_exported_champion_through_ase_matches_in_process_predictions(
    swept, client, tiny_data, tmp_path
) -> None:
    if "champion" not in aliases(client):
        assert promote(swept).returncode == 0
    exported = tmp_path / "model.pt"
    done = subprocess.run(
        [sys.executable, "-m", "sweeper.export", f"models:/{NAME}@champion", "-o", str(exported)],
        cwd=swept, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from metatomic_ase import MetatomicCalculator

    calculator = MetatomicCalculator(str(exported), device="cpu")
    frames = read(tiny_data["validation"], ":")
    energies, forces = [], []
    for atoms in frames:
        atoms.calc = calculator
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())

    model = models.load(f"models:/{NAME}@champion")  # LoRA layers in place, not merged
    dataset, _ = mtt.read_dataset(tiny_data["validation"], mtt.Labels())
    predictions = mtt.predict(model, dataset, torch.device("cpu"), batch_size=1)
    expected_e = np.array([float(p.energy[0][0]) for p in predictions])
    expected_f = np.concatenate([-p.gradient[0].numpy().reshape(-1, 3) for p in predictions])
    np.testing.assert_allclose(energies, expected_e, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(forces), expected_f, rtol=0, atol=1e-5)
    labels = np.array([float(p.energy[1][0]) for p in predictions])
    assert not np.allclose(energies, labels, atol=1e-3)  # a model's numbers, not the reference labels


@needs_chromium
def test_mlflow_ui_shows_the_versions_their_tags_and_aliases(swept, client, tmp_path) -> None:
    if "champion" not in aliases(client):
        assert promote(swept).returncode == 0
    champion = aliases(client)["champion"]
    with serve_mlflow(swept) as url:
        browser = chromium(tmp_path)
        try:
            browser.get(f"{url}/#/models/{NAME}")
            body = lambda: browser.find_element("tag name", "body").text  # noqa: E731
            WebDriverWait(browser, 60).until(lambda _: all(f"Version {n}" in body() for n in (1, 2, 3)))
            assert "champion" in body()
            shot = Path(os.environ.get("SCREENSHOT_DIR", tmp_path)) / "mlflow_registry.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(shot))
            browser.get(f"{url}/#/models/{NAME}/versions/{champion}")
            WebDriverWait(browser, 60).until(lambda _: "adapter_sha256" in body())
            assert "promoted_at" in body() and "champion" in body()
        finally:
            browser.quit()
