"""MLflow: one run per trial, never left RUNNING.

A run ends FINISHED when the trial returns, FAILED (with the error as a tag and an
artifact) when it raises, KILLED on Ctrl-C or SIGTERM (with the reason as a tag).
Per-epoch metrics go out in one `log_batch` call per epoch (about 50x faster than a call
per value).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from sweeper.config import ConfigError
from sweeper.secrets import redact
from sweeper.signals import Terminated, stop_wins

# MLflow's and Optuna's INFO lines ("Creating initial MLflow database tables...", "A new study
# created in RDB") are not for our console, which shows progress and results; warnings stay.
logging.getLogger("mlflow").setLevel(logging.WARNING)
optuna.logging.set_verbosity(optuna.logging.WARNING)

# MLflow 3's UI opens an experiment on its GenAI overview unless it is a model-training one.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


@dataclass(frozen=True)
class DatasetFile:
    """A structure file a trial saw, as an MLflow dataset input (the runs table's Dataset column)."""

    name: str  # e.g. finetune-train
    context: str  # training, validation, test, original
    path: str
    sha256: str
    structures: int


class TrialRun:
    """The MLflow run of one trial."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_datasets(self, files: list[DatasetFile]) -> None:
        inputs = [
            DatasetInput(
                Dataset(
                    name=f.name,
                    digest=f.sha256[:36],  # MLflow's digest column holds 36 characters
                    source_type="local",
                    source=json.dumps({"uri": str(Path(f.path).resolve())}),
                    profile=json.dumps({"num_rows": f.structures, "sha256": f.sha256}),
                ),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, f.context)],
            )
            for f in files
        ]
        # MLflow's store looks the datasets up, then inserts those it did not find: trials that
        # start together race to insert the same dataset, and all but one hit its unique key. The
        # call is idempotent (what exists is reused), so the losers try again.
        for attempt in range(_CONFLICT_ATTEMPTS):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as error:
                if attempt + 1 == _CONFLICT_ATTEMPTS or not _lost_insert_race(error):
                    raise
                time.sleep(0.1 * (attempt + 1))

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, file: Path) -> None:
        if file.is_file():
            self.client.log_artifact(self.run_id, str(file))

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri


_CONFLICT_ATTEMPTS = 5
# How PostgreSQL, SQLite and MySQL word a unique-key violation in the error MLflow passes on.
_UNIQUE_VIOLATION = ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry", "IntegrityError")


def _lost_insert_race(error: MlflowException) -> bool:
    return any(marker in str(error) for marker in _UNIQUE_VIOLATION)


def connect(uri: str, experiment: str) -> str:
    """Point MLflow at `uri` and return the experiment id, creating it once."""
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    try:
        found = client.get_experiment_by_name(experiment)
    except Exception as error:  # unreachable server, unwritable database, ...
        raise ConfigError(
            f"tracking.uri {redact(uri)!r}: cannot reach MLflow ({type(error).__name__}: {error})"
        ) from None
    if found is not None:
        if EXPERIMENT_KIND not in found.tags:  # made before we tagged ours, or by hand
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return found.experiment_id
    try:
        return client.create_experiment(experiment, tags={EXPERIMENT_KIND: MODEL_TRAINING})
    except MlflowException:  # another controller, started at the same time, created it first
        if (found := client.get_experiment_by_name(experiment)) is None:
            raise
        return found.experiment_id


def ui_link(uri: str, page: str) -> str:
    """Where to see an MLflow UI page: on the tracking server, or how to open a local store's UI."""
    uri = redact(uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{page}"


def resolve_uri(given: str | None, configured: str) -> str:
    """A command-line tool's tracking URI: given, else $MLFLOW_TRACKING_URI, else the config's.

    A local SQLite store must exist: MLflow would silently create an empty one.
    """
    uri = given or os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"tracking URI {uri}: no such database here (run where the sweep ran, or pass --tracking-uri)"
        )
    return uri


class Unreachable(ConfigError):
    """The tracking server does not answer. Before a sweep starts, a wrong URL (the sweep stops with
    one line); inside a running sweep, an outage (a restart): the trial is re-queued, not failed."""


def _check_reachable(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        return  # it answered (e.g. 401 behind auth): reachable
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise Unreachable(f"tracking.uri {redact(uri)!r}: MLflow server unreachable ({reason})") from None


@contextlib.contextmanager
def trial_run(
    experiment_id: str,
    run_name: str,
    params: dict[str, str],
    tags: dict[str, str],
    system_metrics: bool,
    log_file: Path | None = None,
    parent_run_id: str | None = None,
) -> Iterator[TrialRun]:
    """Start a run, log params and tags, and always end it with an honest status.

    A sweep's trial attaches to the study's parent run by id; it never re-opens the
    parent (ending a re-opened run would mark the whole study FINISHED).
    """
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        tags=tags,
        log_system_metrics=system_metrics,
        parent_run_id=parent_run_id,
    )
    trial = TrialRun(MlflowClient(), run.info.run_id)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        mlflow.log_params(params)
        with stop_wins():  # a signal that native code turned into an error
            yield trial
        status = RunStatus.to_string(RunStatus.FINISHED)
    except (KeyboardInterrupt, Terminated) as stop:  # Ctrl-C, SIGTERM (scancel, docker stop)
        status = RunStatus.to_string(RunStatus.KILLED)
        with contextlib.suppress(Exception):
            trial.set_tags({"error": f"interrupted: {stop or 'Ctrl-C'}"})
        raise
    except optuna.TrialPruned as pruned:
        status = RunStatus.to_string(RunStatus.KILLED)  # stopped on purpose, not broken
        trial.set_tags({"pruned": "true", "pruned_at": str(pruned)})
        raise
    except BaseException as error:
        _record_error(trial, error)
        raise
    finally:
        with contextlib.suppress(Exception):  # the log is a courtesy; the status is not
            if log_file is not None:
                trial.log_artifact(log_file)
        mlflow.end_run(status=status)


def _record_error(trial: TrialRun, error: BaseException) -> None:
    with contextlib.suppress(Exception):
        trial.set_tags({"error": f"{type(error).__name__}: {error}"[:5000]})
        trial.log_text(traceback.format_exc(), "error.txt")


@functools.lru_cache(maxsize=4)  # once per process, not once per trial
def git_commit(path: Path) -> str | None:
    """The commit of the checkout holding `path`, when there is one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None
