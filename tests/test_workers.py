"""Parallel workers: 4 asynchronous workers on SQLite and on PostgreSQL + `mlflow server`,
and a worker SIGKILLed mid-trial."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psutil
import pytest
from helpers.postgres_server import free_port
from helpers.studies import check_nothing_lost_or_duplicated, sweep_study
from helpers.sweeps import SWEEPER, run_cli, sweep_args
from helpers.tracking import mlflow_client, serve_mlflow
from mlflow.tracking import MlflowClient

from sweeper import tracking
from sweeper.search import workers

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

PASSWORD = "not-a-real-secret-42"


def test_slots_pin_gpus_round_robin_and_split_cores() -> None:
    slots = workers.plan(4, None, ["0", "1"], cores=16)
    assert [s.gpu for s in slots] == ["0", "1", "0", "1"] and {s.threads for s in slots} == {4}
    assert slots[1].environment()["CUDA_VISIBLE_DEVICES"] == "1"
    packed = workers.plan(1, 3, ["0", "1"], cores=12)  # workers_per_gpu wins over n_jobs
    assert [s.gpu for s in packed] == ["0", "1", "0", "1", "0", "1"] and packed[0].threads == 2
    cpu = workers.plan(2, None, [], cores=2)
    assert [s.gpu for s in cpu] == [None, None] and [s.threads for s in cpu] == [1, 1]
    assert "CUDA_VISIBLE_DEVICES" not in cpu[0].environment()
    assert workers.visible_gpus("cpu") == []


def test_four_workers_on_sqlite_lose_and_duplicate_nothing(tiny_data, tmp_path) -> None:
    args = sweep_args(
        tiny_data, tmp_path, "train.epochs=2", "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=4"
    )
    done = run_cli(args, tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study = sweep_study(tmp_path)
    client = mlflow_client(tmp_path)
    check_nothing_lost_or_duplicated(study, client, 8)
    assert "4 workers" in done.stdout + done.stderr
    assert {t.user_attrs["worker"] for t in study.trials} == {
        t.user_attrs["worker"] for t in study.trials[:1]
    }


def test_the_same_sweep_on_postgresql_and_an_mlflow_server(tiny_data, tmp_path, postgres) -> None:
    with postgres.database("optuna") as database, postgres.database("mlflow") as mlflow_store:
        optuna_url = database.replace(f"{postgres.user}@", f"{postgres.user}:{PASSWORD}@", 1)
        with serve_mlflow(
            tmp_path, "--artifacts-destination", str(tmp_path / "artifacts"), store=mlflow_store
        ) as url:
            # The same command as on one box, with only the two URLs changed.
            args = sweep_args(
                tiny_data, tmp_path, "train.epochs=2", "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=4",
                f"hydra.sweeper.storage={optuna_url}", f"tracking.uri={url}",
            )  # fmt: skip
            done = run_cli(args, tmp_path, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
            study = sweep_study(optuna_url)
            client = MlflowClient(tracking_uri=url)
            check_nothing_lost_or_duplicated(study, client, 8)
            assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "pet-lora.db").exists()
            # The storage URL's password (ignored by trust auth here) reaches no param, tag or config.yaml.
            for run in client.search_runs([client.get_experiment_by_name("pet-lora").experiment_id]):
                assert PASSWORD not in str(run.data.params) + str(run.data.tags)
                if "trial_number" not in run.data.tags:
                    continue
                # Every trial that trained logged its config; one that failed first may not have.
                logged = {a.path for a in client.list_artifacts(run.info.run_id)}
                assert "config.yaml" in logged or run.info.status != "FINISHED", run.info.run_name
                if "config.yaml" in logged:
                    text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
                    # The storage URL is no key of a trial's config: it reaches the trial in the environment.
                    assert PASSWORD not in text.read_text() and "postgresql://" not in text.read_text()
            assert PASSWORD not in done.stdout + done.stderr


def test_a_worker_killed_mid_trial_is_retried_and_the_study_completes(tiny_data, tmp_path) -> None:
    args = sweep_args(
        tiny_data, tmp_path, "train.epochs=10", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2"
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sweep = subprocess.Popen(
        [*SWEEPER, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    storage = f"sqlite:///{tmp_path / 'pet-lora.db'}"
    victim = None
    try:
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.5)
            try:
                running = sweep_study(storage).get_trials(states=(optuna.trial.TrialState.RUNNING,))
            except Exception:  # the study does not exist yet
                continue
            training = [t for t in running if "run_id" in t.user_attrs and t.intermediate_values]
            if len(running) == 2 and len(training) == 2:  # both workers mid-trial
                spawned = [
                    p for p in psutil.Process(sweep.pid).children() if "spawn_main" in " ".join(p.cmdline())
                ]
                victim = spawned[0]
                victim.send_signal(signal.SIGKILL)
        assert victim is not None, "no moment with both workers mid-trial"
        out, err = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, err[-3000:]
    study = sweep_study(storage)
    client = mlflow_client(tmp_path)
    check_nothing_lost_or_duplicated(study, client, 3)
    (killed,) = [t for t in study.trials if t.state.name == "FAIL"]
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    run = client.get_run(killed.user_attrs["run_id"])
    assert run.info.status == "FAILED" and "died" in run.data.tags["error"]


def test_hydra_submitit_launcher_runs_the_trials(tiny_data, tmp_path) -> None:
    """`hydra/launcher=submitit_local` here; `submitit_slurm` on a cluster is the same path."""
    args = sweep_args(
        tiny_data, tmp_path, "train.epochs=2", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
        "hydra/launcher=submitit_local",
    )  # fmt: skip
    done = run_cli(args, tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study = sweep_study(tmp_path)
    check_nothing_lost_or_duplicated(study, mlflow_client(tmp_path), 2)
    assert list(tmp_path.glob("multirun/*/*/.submitit/*/*_result.pkl"))  # submitit ran the jobs


def test_an_unreachable_tracking_server_stops_the_sweep_before_anything_starts(tiny_data, tmp_path) -> None:
    args = sweep_args(
        tiny_data, tmp_path, "hydra.sweeper.n_jobs=2", f"tracking.uri=http://127.0.0.1:{free_port()}"
    )
    done = run_cli(args, tmp_path, timeout=900)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: tracking.uri 'http://127.0.0.1:")
    assert "unreachable" in done.stderr and not (tmp_path / "pet-lora.db").exists()


@pytest.mark.parametrize("where", ["mlflow-server-on-postgresql", "sqlite"])
def test_trials_that_start_together_log_the_same_datasets_without_a_conflict(
    where, tmp_path, request
) -> None:
    """MLflow's store looks a dataset up, then inserts it: the first trials of a study, started at
    once by several workers, raced to insert the same dataset and all but one failed."""
    files = [
        tracking.DatasetFile(name, name, str(tmp_path / f"{name}.xyz"), f"{i:064x}", 8)
        for i, name in enumerate(["finetune-train", "finetune-validation", "finetune-test", "original"])
    ]
    with _tracking_store(where, tmp_path, request) as url:
        client = MlflowClient(tracking_uri=url)
        for attempt in range(3):  # a fresh experiment each time: its first datasets are the race
            experiment = client.create_experiment(f"race-{attempt}")
            trials = [tracking.TrialRun(client, client.create_run(experiment).info.run_id) for _ in range(8)]
            start = threading.Barrier(len(trials))
            with concurrent.futures.ThreadPoolExecutor(len(trials)) as pool:
                for done in [pool.submit(_log_at_once, start, trial, files) for trial in trials]:
                    done.result()  # raises what log_datasets raised
            for trial in trials:
                logged = client.get_run(trial.run_id).inputs.dataset_inputs
                assert sorted(d.dataset.name for d in logged) == sorted(f.name for f in files)


@contextlib.contextmanager
def _tracking_store(where: str, workdir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    if where == "sqlite":  # each trial's process opens the file itself, as workers on one box do
        yield f"sqlite:///{workdir / 'mlflow.db'}"
        return
    postgres = request.getfixturevalue("postgres")
    with postgres.database("mlflow") as store, serve_mlflow(workdir, store=store) as url:
        yield url


def _log_at_once(start: threading.Barrier, trial: tracking.TrialRun, files: list) -> None:
    start.wait()
    trial.log_datasets(files)
