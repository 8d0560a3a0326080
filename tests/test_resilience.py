"""Every exit path: signals to controllers and workers, failing trials, late results, restarts
of the database and the tracking server. Afterwards nothing is RUNNING, nothing is lost."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from helpers.postgres_server import free_port
from helpers.studies import check_nothing_lost_or_duplicated, sweep_study
from helpers.sweeps import SWEEPER, compose_config, run_cli, sweep_args, tiny_overrides
from helpers.tracking import mlflow_client, runs, serve_mlflow
from mlflow.tracking import MlflowClient

from sweeper import signals, tracking
from sweeper.registry import versions
from sweeper.search import job, membership, parent_run
from sweeper.search.pruning import Reporter
from sweeper.search.recovery import Recovery
from sweeper.search.trials import tell
from sweeper.signals import Terminated, terminate_as_exception

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out


def _start(arguments: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [*SWEEPER, *arguments], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_a_trained_epoch(workdir: Path, process: subprocess.Popen, timeout: float = 240) -> str:
    """The run id of a trial that is RUNNING and has logged an epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        with contextlib.suppress(Exception):
            client = mlflow_client(workdir)
            for run in runs(workdir):
                if run.info.status == "RUNNING" and "trial_number" in run.data.tags:
                    if client.get_metric_history(run.info.run_id, "epoch/train_loss"):
                        return run.info.run_id
        time.sleep(0.5)
    raise AssertionError("no trial trained an epoch in time")


def _nothing_running(workdir: Path) -> None:
    trials = sweep_study(workdir).trials
    assert not [t.number for t in trials if t.state.name == "RUNNING"]
    assert not [r.info.run_name for r in runs(workdir) if r.info.status == "RUNNING"]


@pytest.mark.parametrize("jobs", [1, 2], ids=["in-process", "workers"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_controller_leaves_nothing_running_and_the_resume_meets_the_budget(
    signum, jobs, tiny_data, tmp_path
) -> None:
    long = sweep_args(
        tiny_data,
        tmp_path,
        "train.epochs=40",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.n_jobs={jobs}",
        "threads=1",
    )
    process = _start(long, tmp_path)
    run_id = _wait_for_a_trained_epoch(tmp_path, process)
    stopped_at = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert time.monotonic() - stopped_at < 30  # within seconds, not after the trial
    assert "sweep stopped" in stderr and "Traceback" not in stderr
    _nothing_running(tmp_path)
    client = mlflow_client(tmp_path)
    interrupted = client.get_run(run_id)
    assert interrupted.info.status == "KILLED" and "interrupted" in interrupted.data.tags["error"]
    (parent,) = [r for r in runs(tmp_path) if r.data.tags.get("role") == "study"]
    assert parent.info.status == "KILLED"
    trials = sweep_study(tmp_path).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all("interrupted" in t.user_attrs["error"] for t in failed)
    queued = [t for t in trials if t.state.name == "WAITING"]
    # Optuna keeps a queued trial's parameters in its system attributes until it runs.
    requeued = {tuple(sorted(t.system_attrs["fixed_params"].items())) for t in queued}
    assert requeued >= {tuple(sorted(failed[0].params.items()))}
    # The same command, shorter epochs: the re-queued trials run, the budget is met.
    resumed = run_cli(
        sweep_args(
            tiny_data,
            tmp_path,
            "train.epochs=1",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweeper.n_jobs={jobs}",
            "threads=1",
        ),
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_nothing_lost_or_duplicated(sweep_study(tmp_path), client, 2)


def test_a_sweep_stopped_before_any_trial_completed_prints_its_one_line(tiny_data, tmp_path) -> None:
    """No plot can be drawn without a complete trial: the console shows the stop, not Optuna's
    warnings about it ("There are no complete trials", "does not contain completed trials")."""
    arguments = sweep_args(tiny_data, tmp_path, "train.epochs=40", "hydra.sweeper.n_trials=1", "threads=1")
    process = _start(arguments, tmp_path)
    _wait_for_a_trained_epoch(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    # The progress bar redraws itself with carriage returns: its last state is the line's.
    console = [line.split("\r")[-1] for line in (stdout + stderr).splitlines()]
    printed = [line for line in console if line.strip() and not line.startswith("study pet-lora")]
    stop = "sweep stopped (stopped by SIGTERM)"
    assert len(printed) == 1 and printed[0].startswith(stop), "\n".join(console)


def _asked_trial(tiny_data, workdir: Path, storage: str, name: str, monkeypatch):
    """(study, trial, the trial's config): a trial asked of a new study, as a sweep hands it out
    (the storage URL in the environment, the rest in `+sweep.*` overrides)."""
    study = optuna.create_study(study_name=name, storage=storage)
    trial = study.ask()
    monkeypatch.setenv(membership.STORAGE_ENV, storage)
    told = membership.Membership(name, trial.number, trial._trial_id).overrides()
    cfg = compose_config([*tiny_overrides(tiny_data, workdir), *told])
    return study, trial, cfg


def _native_call(signum: int) -> None:
    """Native code around the signal's handler, as TorchScript's argument conversion was in CI
    (a SIGTERM ended a trial FAIL with "Expected a value of type 'Any' for argument 'names'"):
    it catches the handler's exception and raises a RuntimeError of its own."""
    try:
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler runs here
    except BaseException:
        raise RuntimeError("Expected a value of type 'Any' for argument 'names'") from None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_that_native_code_turns_into_an_error_still_stops_the_trial(
    signum, tiny_data, tmp_path, monkeypatch
) -> None:
    stop = KeyboardInterrupt if signum == signal.SIGINT else Terminated
    experiment = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}", "native")
    with terminate_as_exception(), pytest.raises(stop):
        with tracking.trial_run(experiment, "t0", {}, {}, False, None) as run:
            _native_call(signum)
    ended = MlflowClient().get_run(run.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["error"].startswith("interrupted")
    # job.run returns any other error as a failed trial; a stop goes through, to be queued again.
    monkeypatch.setattr(job.trial, "run", lambda *args, **kwargs: _native_call(signum))
    _, _, cfg = _asked_trial(tiny_data, tmp_path, f"sqlite:///{tmp_path / 'study.db'}", "native", monkeypatch)
    with terminate_as_exception(), pytest.raises(stop):
        job.run(cfg, tmp_path, None, optuna.pruners.NopPruner())
    signals.raise_pending()  # nothing stale after the block
    # In training (deferred), the handler only records; a safe point raises; a second signal at once.
    with terminate_as_exception(), pytest.raises(stop):
        with signals.deferred():
            os.kill(os.getpid(), signum)
            time.sleep(0.2)  # the handler ran and did not raise
            with pytest.raises(stop):
                os.kill(os.getpid(), signum)
                time.sleep(5)
            signals.raise_pending()
    # Native code that swallows the stop whole: the next epoch's end raises it.
    with terminate_as_exception(), pytest.raises(stop):
        with contextlib.suppress(RuntimeError):
            _native_call(signum)
        signals.raise_pending()
    with pytest.raises(RuntimeError):  # with no signal, the same error is the trial's failure
        with terminate_as_exception(), tracking.trial_run(experiment, "t1", {}, {}, False, None):
            raise RuntimeError("a real failure")


def test_sigterm_to_a_worker_ends_its_run_and_its_trial_is_retried(tiny_data, tmp_path) -> None:
    arguments = sweep_args(
        tiny_data,
        tmp_path,
        "train.epochs=12",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "threads=1",
    )
    process = _start(arguments, tmp_path)
    run_id = _wait_for_a_trained_epoch(tmp_path, process)
    workers = subprocess.run(
        ["pgrep", "-P", str(process.pid), "-f", "multiprocessing.spawn"], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2
    for pid in workers:  # which worker runs it does not matter: both are mid-trial
        os.kill(int(pid), signal.SIGTERM)
        break
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    client = mlflow_client(tmp_path)
    check_nothing_lost_or_duplicated(sweep_study(tmp_path), client, 2)
    stopped = [r for r in runs(tmp_path) if r.info.status != "FINISHED" and "trial_number" in r.data.tags]
    assert [r.info.status for r in stopped] == ["KILLED"]  # the worker ended its run on the way out
    assert run_id in {r.info.run_id for r in runs(tmp_path)}
    retried = [t for t in sweep_study(tmp_path).trials if "retry_of" in t.user_attrs]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"


def test_sigkill_of_the_controller_is_cleaned_up_by_the_next_one(tiny_data, tmp_path) -> None:
    beat = "hydra.sweeper.heartbeat_interval=5"  # stale after 3 missed beats: 15 s, not 90
    arguments = sweep_args(
        tiny_data, tmp_path, "train.epochs=40", "hydra.sweeper.n_trials=2", "threads=1", beat
    )
    process = _start(arguments, tmp_path)
    run_id = _wait_for_a_trained_epoch(tmp_path, process)
    process.kill()
    process.communicate(timeout=60)
    client = mlflow_client(tmp_path)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could end it
    resumed = run_cli(
        sweep_args(tiny_data, tmp_path, "train.epochs=1", "hydra.sweeper.n_trials=2", "threads=1", beat),
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    orphan = client.get_run(run_id)
    assert orphan.info.status == "FAILED"
    reasons = ("left running by an earlier process", "stopped sending heartbeats")  # no beat / a stale one
    assert any(reason in orphan.data.tags["error"] for reason in reasons), orphan.data.tags["error"]
    check_nothing_lost_or_duplicated(sweep_study(tmp_path), client, 2)
    (parent,) = [r for r in runs(tmp_path) if r.data.tags.get("role") == "study"]
    assert parent.info.status == "FINISHED"


@pytest.mark.parametrize("jobs", [1, 2], ids=["in-process", "workers"])
def test_a_trial_that_fails_is_a_failed_trial_and_the_sweep_goes_on(jobs, tiny_data, tmp_path) -> None:
    """One of two validation files is missing: its trial fails with the reason in Optuna and
    MLflow, the other completes, and one failure does not stop the sweep."""
    missing = tmp_path / "missing.xyz"
    choice = f"data.finetune.validation={tiny_data['validation']},{missing}"
    done = run_cli(
        sweep_args(
            tiny_data,
            tmp_path,
            choice,
            "lora.rank=2",
            "lora.alpha=16",
            "train.lr=1e-3",
            "hydra/sweeper/sampler=grid",
            f"hydra.sweeper.n_jobs={jobs}",
            "threads=1",
            "train.epochs=1",
        ),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = sweep_study(tmp_path).trials
    # Each grid cell is tried once: the failed one is not asked again, the good one completes.
    states = [t.state.name for t in trials]
    assert sorted(states) == ["COMPLETE", "FAIL"], states
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert "ConfigError" in failed.user_attrs["error"] and str(missing) in failed.user_attrs["error"]
    recorded = [r for r in runs(tmp_path) if r.data.tags.get("trial_number") == str(failed.number)]
    assert len(recorded) == 1 and recorded[0].info.status == "FAILED"
    assert str(missing) in recorded[0].data.tags["error"]
    _nothing_running(tmp_path)


def test_a_grid_cell_that_fails_is_tried_once_per_run_of_the_command(tiny_data, tmp_path) -> None:
    """A cell whose trial fails for a reason in its configuration (here a missing validation file)
    is not asked again: the grid ends once each cell was tried, the failed one reported; the same
    command (after the cause is fixed, say) tries the failed cell once more, the others not."""
    missing = tmp_path / "missing.xyz"
    arguments = sweep_args(
        tiny_data, tmp_path, f"data.finetune.validation={tiny_data['validation']},{missing}", "lora.rank=2",
        "lora.alpha=16", "train.lr=1e-3", "hydra/sweeper/sampler=grid", "threads=1", "train.epochs=1",
    )  # fmt: skip
    first = run_cli(arguments, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    trials = sweep_study(tmp_path).trials
    cells = [t.params["data.finetune.validation"] for t in trials]
    assert sorted(cells) == sorted([str(tiny_data["validation"]), str(missing)]), cells  # each once
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"]
    assert "grid: 1 of 2 cells failed" in first.stdout and str(missing) in first.stdout, first.stdout
    again = run_cli(arguments, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    retried = sweep_study(tmp_path).trials[len(trials) :]
    assert [(t.params["data.finetune.validation"], t.state.name) for t in retried] == [(str(missing), "FAIL")]


def test_a_search_space_a_trial_would_reject_stops_before_the_study(tiny_data, tmp_path) -> None:
    done = run_cli(sweep_args(tiny_data, tmp_path, "lora.rank=range(0,4)"), cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: lora.rank: the search space reaches 0") and "must be >= 1" in line
    assert not (tmp_path / "pet-lora.db").exists()


@pytest.mark.parametrize("space", ["int(interval(0,96))", "range(0,96,2)", "choice(0,2,16)"])
def test_a_replay_space_below_one_batch_stops_before_the_study(space, tiny_data, tmp_path) -> None:
    """Replay is off or fills a batch (train.batch_size 4 here, replayed batches of that size):
    each space reaches 1 or 2."""
    batches = ("train.batch_size=4", "finetune.replay.batch_size=null")
    done = run_cli(
        sweep_args(tiny_data, tmp_path, f"finetune.replay.structures={space}", *batches),
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: finetune.replay.structures: the search space reaches ") and "batch" in line
    assert not (tmp_path / "pet-lora.db").exists()


def test_a_late_result_is_kept_in_mlflow_and_dropped_by_optuna(tiny_data, tmp_path, monkeypatch) -> None:
    """A trial failed as stale (its heartbeats lost in a database outage) while its worker ran
    on: its per-epoch reports and its final result arrive after Optuna finished it."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study, trial, cfg = _asked_trial(tiny_data, tmp_path, storage, "late", monkeypatch)
    reporter = Reporter(membership.of(cfg), cfg, optuna.pruners.MedianPruner())
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # what a stale heartbeat does
    reporter(0, {"val_force_mae_meV_per_A": 50.0})  # no error: the trial goes on training
    reporter(1, {"val_force_mae_meV_per_A": 40.0})
    assert reporter.silent
    client = mlflow_client(tmp_path)
    run = client.create_run(client.create_experiment("late"))
    outcome = {
        "state": "complete",
        "values": [40.0],
        "constraints": [],
        "metrics": {},
        "run_id": run.info.run_id,
    }
    state = tell(study, trial, outcome, client, pareto=False)
    assert state.name == "FAIL" and study.trials[0].state.name == "FAIL" and study.trials[0].values is None
    assert client.get_run(run.info.run_id).data.tags["late_result"] == "true"


def test_restarts_of_postgresql_and_the_mlflow_server_mid_sweep_lose_nothing(
    postgres, tiny_data, tmp_path
) -> None:
    if postgres.restart is None:
        pytest.skip("the configured PostgreSQL server is not ours to restart")
    port = free_port()
    with postgres.database("restart_optuna") as optuna_url, postgres.database("restart_mlflow") as mlflow_url:
        arguments = sweep_args(
            tiny_data,
            tmp_path,
            "train.epochs=8",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.n_jobs=2",
            "threads=1",
            "hydra.sweeper.heartbeat_interval=5",
            f"hydra.sweeper.storage={optuna_url}",
            f"tracking.uri=http://127.0.0.1:{port}",
        )
        # The same port after the restart: the sweep knows the server by its URL.
        artifacts = ("--artifacts-destination", str(tmp_path / "artifacts"))
        restartable = functools.partial(serve_mlflow, tmp_path, *artifacts, store=mlflow_url, port=port)
        server = restartable()
        server.__enter__()
        try:
            process = _start(arguments, tmp_path)
            client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 240
            while not [
                r for r in _all_runs(client) if r.info.status == "RUNNING" and "trial_number" in r.data.tags
            ]:
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][
                    -3000:
                ]
                time.sleep(1)
            time.sleep(3)
            postgres.restart()  # every connection of the sweep and its trials drops
            time.sleep(2)
            server.__exit__(None, None, None)  # the tracking server goes away for a few seconds
            time.sleep(3)
            server = restartable()
            server.__enter__()
            _, stderr = process.communicate(timeout=900)
            assert process.returncode == 0, stderr[-3000:]
            study = sweep_study(optuna_url)
            check_nothing_lost_or_duplicated(study, client, 4)
        finally:
            server.__exit__(None, None, None)


def _all_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("pet-lora")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def test_a_trial_that_finds_the_tracking_server_down_is_retried_not_failed(
    tiny_data, tmp_path, monkeypatch
) -> None:
    """The MLflow server restarting as a worker takes a trial (the soak, benchmarks/soak.py): the trial
    cannot reach it. That is the server's outage, not the trial's parameters: the outcome is a crash,
    which is re-queued with its parameters and not counted against max_failure_rate (it was a plain
    failure: the drawn parameters were dropped, and enough of them stopped the sweep)."""
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(job.trial, "run", lambda *args, **kwargs: tracking.connect(down, "pet-lora"))
    _, _, cfg = _asked_trial(tiny_data, tmp_path, f"sqlite:///{tmp_path / 'study.db'}", "outage", monkeypatch)
    outcome = job.run(cfg, tmp_path, None, optuna.pruners.NopPruner())
    assert outcome["state"] == "crash", outcome
    assert "MLflow server unreachable" in outcome["error"]


def test_a_trial_stopped_after_it_registered_its_adapter_leaves_no_version(tmp_path) -> None:
    """The soak (benchmarks/soak.py, seed 0) found a registered version whose run had ended KILLED:
    the worker was stopped between registering the adapter and finishing its run. The trial is
    re-queued, and its re-run registers again; the version of the stopped run must not stay, or
    promotion could pick an adapter from a run that never finished."""
    client = mlflow_client(tmp_path)
    experiment = client.create_experiment("stopped")
    run_id = client.create_run(experiment).info.run_id
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter.json").write_text("{}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions.register(client, "m-lora", experiment, run_id, folder, {"adapter_sha256": "0" * 64}, "test")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="stopped")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("run_id", run_id)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    recovery = Recovery(max_retries=2)
    recovery.client = client
    assert recovery.retry(study, study.trials[0], "its worker process died mid-trial")
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.search_model_versions(f"run_id = '{run_id}'") == []


def test_a_stop_while_a_failed_trial_is_recorded_leaves_no_run_running(tmp_path, monkeypatch) -> None:
    """The soak (benchmarks/soak.py, seed 0) found a run 't62 failed' left RUNNING: its controller
    was stopped (SIGTERM) between creating the run that records a trial which failed before its own
    run existed and ending it FAILED. No controller ever ends it afterwards: its trial is finished."""
    client = mlflow_client(tmp_path)
    experiment = client.create_experiment("record")
    parent = client.create_run(experiment).info.run_id
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="record")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def stopped(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(client, "log_param", stopped)
    monkeypatch.setattr(client, "log_batch", stopped)
    with pytest.raises(Terminated):
        parent_run.record_failure(client, experiment, parent, "record", study.trials[0], "its worker died")
    (recorded,) = [r for r in client.search_runs([experiment]) if r.info.run_id != parent]
    assert recorded.info.status == "FAILED"
