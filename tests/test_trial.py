"""One trial end to end: the CLI, what MLflow holds, the adapter, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.sweeps import compose_config, run_cli, tiny_overrides, trial_cli
from helpers.tracking import adapter_folder, mlflow_client, runs

from sweeper import adapter, embedded, evaluate, files, trial
from sweeper import metatrain as mtt

FINAL_METRICS = [
    f"{prefix}_{quantity}"
    for prefix in ("val", "test", "retained", "base")
    for quantity in (
        "energy_mae_meV_per_atom",
        "energy_rmse_meV_per_atom",
        "force_mae_meV_per_A",
        "force_rmse_meV_per_A",
    )
] + [
    "retained_force_mae_increase_meV_per_A",
    "retained_force_mae_ratio",
    "retained_energy_mae_ratio",
    "best_epoch",
    "epochs_run",
    "trainable_parameters",
]


@pytest.fixture(scope="module")
def cli_trial(tiny_data, tmp_path_factory):
    """`python -m sweeper` on tiny data, as a user runs it."""
    workdir = tmp_path_factory.mktemp("cli")
    done, run = trial_cli(tiny_overrides(tiny_data, workdir), workdir)
    return workdir, done, run


def _val_errors(model: mtt.PET, path: Path) -> dict[str, float]:
    dataset, _ = mtt.read_dataset(path, mtt.Labels())
    return evaluate.errors(model, dataset, mtt.Labels(), torch.device("cpu"))


def test_cli_prints_a_summary(cli_trial) -> None:
    _, done, run = cli_trial
    for text in (
        "fine-tuning validation",
        "original set, fine-tuned",
        "original set, base model",
        run.info.run_id,
        f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
    ):
        assert text in done.stdout


def test_console_shows_an_epoch_bar_and_the_summary_while_metatrains_log_goes_to_the_file(cli_trial) -> None:
    workdir, done, _ = cli_trial
    bar = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.startswith("fine-tuning:")]
    assert bar and "3/3" in bar[-1] and "val MAE E" in bar[-1] and "meV/Å" in bar[-1]
    console = done.stdout + done.stderr
    assert "Epoch:" not in console and "Using best model" not in console and "[HYDRA]" not in console
    assert "best epoch" in done.stdout  # ours, the only one on the console
    log = next(workdir.glob("outputs/*/*/trial.log")).read_text()
    assert log.count("Epoch:") == 3 and "validation forces MAE" in log


@pytest.mark.slow  # a whole trial of its own (30-40 s on 2 cores)
def test_verbose_puts_metatrains_log_on_the_console(tiny_data, tmp_path) -> None:
    done = run_cli([*tiny_overrides(tiny_data, tmp_path), "train.epochs=1", "verbose=true"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Epoch:" in done.stderr and "trial finished" in done.stdout


def test_the_experiment_is_a_model_training_one_and_runs_list_their_datasets(cli_trial, tiny_data) -> None:
    workdir, _, run = cli_trial
    client = mlflow_client(workdir)
    assert (
        client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )
    logged = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(logged) == ["finetune-test", "finetune-train", "finetune-validation", "original"]
    contexts = {
        name: [t.value for t in d.tags if t.key == "mlflow.data.context"] for name, d in logged.items()
    }
    assert contexts["finetune-train"] == ["training"] and contexts["original"] == ["original"]
    for name, role in (
        ("finetune-train", "train"),
        ("finetune-validation", "validation"),
        ("original", "original"),
    ):
        profile = json.loads(logged[name].dataset.profile)
        assert profile["sha256"] == run.data.tags[f"data_{role}_sha256"]
        assert logged[name].dataset.digest == profile["sha256"][:36]
        assert json.loads(logged[name].dataset.source)["uri"] == str(Path(tiny_data[role]).resolve())
    assert json.loads(logged["finetune-train"].dataset.profile)["num_rows"] == 8
    assert json.loads(logged["original"].dataset.profile)["num_rows"] == 6


def test_run_is_finished_with_metrics_params_tags_and_artifacts(cli_trial) -> None:
    workdir, _, run = cli_trial
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r4 a32 lr2e-3"
    missing = [name for name in FINAL_METRICS if name not in run.data.metrics]
    assert not missing
    assert run.data.params["lora.rank"] == "4" and run.data.params["train.epochs"] == "3"
    tags = run.data.tags
    assert tags["base_checkpoint_sha256"] == files.file_sha256(embedded.base_model_path())
    assert tags["metatrain_version"] == mtt.METATRAIN_VERSION
    assert {"data_train_sha256", "data_validation_sha256", "data_original_sha256"} <= set(tags)
    client = mlflow_client(workdir)
    history = client.get_metric_history(run.info.run_id, "epoch/val_force_mae_meV_per_A")
    assert sorted(m.step for m in history) == list(range(int(run.data.metrics["epochs_run"])))
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config.yaml", "trial.log"} <= top
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert artifacts == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}


def test_reapplied_adapter_reproduces_logged_validation_metrics(cli_trial, tiny_data) -> None:
    workdir, _, run = cli_trial
    folder = adapter_folder(workdir, run)
    config = adapter.read_config(folder)
    assert config["rank"] == 4 and config["scaling"] == 32.0 / 4  # the default alpha
    assert all(name.rsplit(".", 2)[-2].startswith("lora_") for name in config["tensors"])
    torch.set_num_threads(2)
    model = adapter.apply(folder, embedded.base_model_path())
    reproduced = _val_errors(model, tiny_data["validation"])
    for name, value in reproduced.items():
        assert value == pytest.approx(run.data.metrics[f"val_{name}"], rel=1e-12, abs=0)


def test_adapter_refuses_another_base_checkpoint(cli_trial, tmp_path) -> None:
    workdir, _, run = cli_trial
    folder = adapter_folder(workdir, run)
    checkpoint = torch.load(embedded.base_model_path(), weights_only=False)
    checkpoint["epoch"] = -1
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    with pytest.raises(adapter.AdapterError, match="not the adapter's base"):
        adapter.apply(folder, other)


@pytest.mark.slow  # a whole trial of its own (30-40 s on 2 cores)
def test_same_seed_and_threads_give_the_same_numbers(cli_trial, tiny_data, tmp_path) -> None:
    _, _, first = cli_trial
    done = run_cli(tiny_overrides(tiny_data, tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (second,) = runs(tmp_path)
    for name in FINAL_METRICS:
        assert second.data.metrics[name] == first.data.metrics[name], name


def _in_process(tiny_data, tmp_path, monkeypatch, overrides, **kwargs) -> trial.TrialResult:
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(tiny_overrides(tiny_data, tmp_path) + overrides)
    return trial.run(cfg, tmp_path / "out", **kwargs)


def test_zero_init_starts_exactly_at_the_base_model(tiny_data, tmp_path, monkeypatch) -> None:
    result = _in_process(tiny_data, tmp_path, monkeypatch, ["train.lr=1e-30", "train.epochs=1"])
    m = result.metrics
    for name in (
        "energy_mae_meV_per_atom",
        "energy_rmse_meV_per_atom",
        "force_mae_meV_per_A",
        "force_rmse_meV_per_A",
    ):
        assert m[f"retained_{name}"] == m[f"base_{name}"], name


def test_metatrain_init_moves_the_model_before_training(tiny_data, tmp_path, monkeypatch) -> None:
    """The contrast to the test above: metatrain's random B changes the base at step 0."""
    overrides = ["train.lr=1e-30", "train.epochs=1", "lora.init=metatrain"]
    m = _in_process(tiny_data, tmp_path, monkeypatch, overrides).metrics
    assert m["retained_force_mae_meV_per_A"] != m["base_force_mae_meV_per_A"]


def test_a_failure_mid_training_ends_the_run_failed(tiny_data, tmp_path, monkeypatch) -> None:
    def explode(epoch: int, row: dict[str, float]) -> None:
        if epoch == 1:
            raise RuntimeError("simulated crash in epoch 1")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _in_process(tiny_data, tmp_path, monkeypatch, [], on_epoch=explode)
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"
    assert "simulated crash in epoch 1" in run.data.tags["error"]


def test_stopping_from_the_epoch_hook_keeps_the_best_epoch(tiny_data, tmp_path, monkeypatch) -> None:
    def stop(epoch: int, row: dict[str, float]) -> None:
        if epoch == 1:
            raise mtt.StopTraining(epoch, "test")

    result = _in_process(tiny_data, tmp_path, monkeypatch, ["train.epochs=5"], on_epoch=stop)
    assert result.epochs_run == 2 and result.best_epoch in (0, 1)
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["stopped_early"] == "true"
    model = adapter.apply(result.adapter_dir, embedded.base_model_path())
    assert _val_errors(model, tiny_data["validation"])["force_mae_meV_per_A"] == pytest.approx(
        result.metrics["val_force_mae_meV_per_A"], rel=1e-12
    )


@pytest.mark.parametrize(("scheduler", "ratio"), [("constant", 1.0), ("exponential", 0.5), ("step", 0.5)])
def test_schedulers_shape_the_learning_rate(scheduler, ratio, tiny_data, tmp_path, monkeypatch) -> None:
    rates = []
    overrides = [f"train.scheduler={scheduler}", "train.gamma=0.5", "train.step_size=1", "train.epochs=3"]
    _in_process(
        tiny_data,
        tmp_path,
        monkeypatch,
        overrides,
        on_epoch=lambda e, row: rates.append(row["learning_rate"]),
    )
    assert len(rates) == 3
    for before, after in zip(rates, rates[1:], strict=False):
        assert after == pytest.approx(before * ratio, rel=1e-3)


@pytest.mark.parametrize("method", ["heads", "full"])
def test_other_methods_save_what_trained_and_reapply(method, tiny_data, tmp_path, monkeypatch) -> None:
    result = _in_process(tiny_data, tmp_path, monkeypatch, [f"finetune={method}", "train.epochs=2"])
    names = adapter.read_config(result.adapter_dir)["tensors"]
    base = mtt.load_checkpoint(embedded.base_model_path())
    if method == "heads":
        assert names and all("heads" in name or "last_layers" in name for name in names)
    else:
        assert len(names) == len(list(base.parameters()))
    assert not any("lora_" in name for name in names)
    model = adapter.apply(result.adapter_dir, embedded.base_model_path())
    assert _val_errors(model, tiny_data["validation"])["force_mae_meV_per_A"] == pytest.approx(
        result.metrics["val_force_mae_meV_per_A"], rel=1e-12
    )


@pytest.mark.slow  # a whole trial of its own (30-40 s on 2 cores)
def test_system_metrics_are_switchable(tiny_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    _in_process(tiny_data, tmp_path, monkeypatch, ["tracking.system_metrics=true", "train.epochs=4"])
    (run,) = runs(tmp_path)
    assert any(name.startswith("system/cpu") for name in run.data.metrics), sorted(run.data.metrics)


def test_system_metrics_are_off_by_default(cli_trial) -> None:
    _, _, run = cli_trial
    assert not any(name.startswith("system/") for name in run.data.metrics)


def test_trials_in_one_process_repeat_exactly(tiny_data, tmp_path, monkeypatch) -> None:
    """A sweep runs many trials in one process, sharing cached datasets: nothing leaks between them."""
    first = _in_process(tiny_data, tmp_path / "a", monkeypatch, ["train.epochs=2"])
    second = _in_process(tiny_data, tmp_path / "b", monkeypatch, ["train.epochs=2"])
    timings = {"train_seconds", "evaluation_seconds", "seconds_per_epoch"}
    assert first.metrics.keys() == second.metrics.keys()
    for name in first.metrics.keys() - timings:
        assert second.metrics[name] == first.metrics[name], name
