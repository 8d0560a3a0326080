"""Replay of the original set: disjoint from retention, both label kinds, every method, sweepable."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from helpers.studies import sweep_study
from helpers.sweeps import compose_config, merged, run_cli, tiny_overrides
from helpers.tracking import mlflow_client, runs

from sweeper import adapter, data, embedded, evaluate, replay, trial
from sweeper import metatrain as mtt
from sweeper.config import ConfigError

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

TIMINGS = {"train_seconds", "evaluation_seconds", "seconds_per_epoch"}


def _overrides(tiny_data, workdir, *extra: str) -> list[str]:
    """Tiny data; 2 of the 6 original structures measure retention, up to 4 others replay."""
    defaults = [*tiny_overrides(tiny_data, workdir), "train.epochs=2", "data.original.max_structures=2"]
    return merged(defaults, list(extra))


def _run(tiny_data, tmp_path, monkeypatch, name: str, *extra: str) -> trial.TrialResult:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    return trial.run(compose_config(_overrides(tiny_data, folder, *extra)), folder / "out")


def _indices(result: trial.TrialResult, folder) -> dict[str, list[int]]:
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    return json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/original_indices.json"))


@pytest.mark.parametrize("labels", ["reference", "base"])
def test_replay_trains_on_disjoint_structures_and_repeats_exactly(
    labels, tiny_data, tmp_path, monkeypatch
) -> None:
    extra = ("finetune.replay.structures=4", f"finetune.replay.labels={labels}")
    first = _run(tiny_data, tmp_path, monkeypatch, "a", *extra)
    second = _run(tiny_data, tmp_path, monkeypatch, "b", *extra)
    without = _run(tiny_data, tmp_path, monkeypatch, "c", "finetune.replay.structures=0")
    for name in first.metrics.keys() - TIMINGS:
        assert second.metrics[name] == first.metrics[name], name  # same seed and threads: same numbers
    assert (
        first.metrics["val_force_mae_meV_per_A"] != without.metrics["val_force_mae_meV_per_A"]
    )  # it trained
    indices = _indices(first, tmp_path / "a")
    assert len(indices["retained"]) == 2 and len(indices["replay"]) == 4
    assert not set(indices["retained"]) & set(indices["replay"])
    run = mlflow_client(tmp_path / "a").get_run(first.run_id)
    assert run.data.params["original.retained_structures"] == "2"
    assert run.data.params["original.replay_structures"] == "4"
    assert run.info.run_name.endswith("replay4" + ("b" if labels == "base" else ""))
    assert (
        adapter.read_config(first.adapter_dir)["tensors"]
        == adapter.read_config(without.adapter_dir)["tensors"]
    )


def test_base_labels_are_the_base_models_own_predictions(tiny_data, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(
        _overrides(tiny_data, tmp_path, "finetune.replay.structures=4", "finetune.replay.labels=base")
    )
    cpu = torch.device("cpu")
    replayed = replay.load(cfg, cfg.model.checkpoint, {}, cpu)
    base = mtt.load_checkpoint(embedded.base_model_path())
    errors = evaluate.errors(base, replayed.dataset, replayed.labels, cpu)
    assert errors["energy_mae_meV_per_atom"] < 1e-3 and errors["force_mae_meV_per_A"] < 1e-3
    reference = replay.load(
        compose_config(_overrides(tiny_data, tmp_path, "finetune.replay.structures=4")),
        cfg.model.checkpoint,
        {},
        cpu,
    )
    assert evaluate.errors(base, reference.dataset, reference.labels, cpu)["force_mae_meV_per_A"] > 1.0


def test_replay_moves_to_the_refit_reference(tiny_data, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(_overrides(tiny_data, tmp_path, "finetune.replay.structures=4"))
    plain = replay.load(cfg, cfg.model.checkpoint, {}, torch.device("cpu"))
    shifted = replay.load(cfg, cfg.model.checkpoint, {29: 0.25}, torch.device("cpu"))
    for index in range(4):
        atoms = len(plain.dataset[index]["system"])
        before = float(plain.dataset[index]["energy"].block().values)
        after = float(shifted.dataset[index]["energy"].block().values)
        assert after - before == pytest.approx(0.25 * atoms, abs=1e-9)


@pytest.mark.parametrize("method", ["full", "heads"])
def test_replay_works_with_every_method(method, tiny_data, tmp_path, monkeypatch) -> None:
    result = _run(
        tiny_data,
        tmp_path,
        monkeypatch,
        method,
        f"finetune={method}",
        "finetune.replay.structures=4",
        "train.epochs=1",
    )
    assert "retained_force_mae_ratio" in result.metrics
    model = adapter.apply(result.adapter_dir, embedded.base_model_path())
    labels = data.labels_of(compose_config([]).data.finetune)
    dataset, _ = mtt.read_dataset(tiny_data["validation"], labels)
    torch.set_num_threads(2)
    again = evaluate.errors(model, dataset, labels, torch.device("cpu"))
    assert again["force_mae_meV_per_A"] == pytest.approx(result.metrics["val_force_mae_meV_per_A"], rel=1e-12)


def test_a_file_too_small_for_both_sets_is_a_one_line_error(tiny_data, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(_overrides(tiny_data, tmp_path, "finetune.replay.structures=5"))
    with pytest.raises(
        ConfigError, match=r"holds 6 structures, 2 measure retained accuracy .* 5 were asked .* at most 4"
    ):
        trial.run(cfg, tmp_path / "out")
    assert runs(tmp_path) == []
    cfg = compose_config(
        _overrides(tiny_data, tmp_path, "finetune.replay.structures=4", "data.original.max_structures=null")
    )
    with pytest.raises(ConfigError, match="set data.original.max_structures"):
        trial.run(cfg, tmp_path / "out")
    for extra, batch in (
        ("finetune.replay.batch_size=null", "train.batch_size 4"),
        ("", "finetune.replay.batch_size 2"),
    ):
        structures = 3 if extra else 1
        cfg = compose_config(
            _overrides(
                tiny_data, tmp_path, f"finetune.replay.structures={structures}", *filter(None, [extra])
            )
        )
        below_a_batch = (
            rf"^finetune.replay.structures must be 0 \(off\) or at least {batch} .*got {structures}$"
        )
        with pytest.raises(ConfigError, match=below_a_batch):
            trial.run(cfg, tmp_path / "out")
    assert runs(tmp_path) == []


def test_a_sweep_over_replay_and_method_registers_its_feasible_trials(tiny_data, tmp_path) -> None:
    arguments = [
        "-m",
        *_overrides(
            tiny_data,
            tmp_path,
            "finetune.replay.structures=0,4",
            "finetune.method=lora,full",
            "lora.rank=2,4",
            "hydra.sweeper.n_trials=4",
            "hydra/sweeper/pruner=none",
            "objective=pareto",
        ),
    ]
    done = run_cli(arguments, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = sweep_study(tmp_path)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    assert {t.params["finetune.method"] for t in complete} <= {"lora", "full"}
    assert {t.params["finetune.replay.structures"] for t in complete} <= {0, 4}
    children = {r.info.run_id: r for r in runs(tmp_path) if "trial_number" in r.data.tags}
    for t in complete:
        replayed = t.params["finetune.replay.structures"]
        assert children[t.user_attrs["run_id"]].data.params["original.replay_structures"] == str(replayed)
    feasible = {t.user_attrs["run_id"] for t in complete if t.user_attrs["constraints"][0] <= 0}
    versions = mlflow_client(tmp_path).search_model_versions()
    assert {v.run_id for v in versions} == feasible
