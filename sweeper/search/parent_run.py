"""The study's MLflow parent run, and what the controller writes on its children."""

from __future__ import annotations

import time
from typing import Any

import optuna
from mlflow.entities import Param, RunStatus
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from sweeper.search import results
from sweeper.secrets import redact

PARENT_RUN_ATTR = "mlflow_parent_run_id"
PARENT_RUN_WAIT = 60.0  # seconds a joining controller waits for the study's creator to open its run


def open_run(
    client: MlflowClient,
    study: optuna.Study,
    created: bool,
    experiment_id: str,
    storage: str,
    settings: dict[str, Any],
) -> str:
    """One parent run per study: opened by the controller that created the study (with the
    study's settings as params), reopened when the study resumes."""
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is None and not created:  # its creator, maybe on another machine, opens it now
        run_id = _wait_for_user_attr(study, PARENT_RUN_ATTR, PARENT_RUN_WAIT)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    name = study.study_name
    run = client.create_run(
        experiment_id,
        run_name=f"study {name}",
        tags={"study_name": name, "optuna_storage": redact(storage), "role": "study"},
    )
    for key, value in settings.items():  # redacted: fixed values may hold a URL with a password
        client.log_param(run.info.run_id, key, redact(str(value))[:6000])
    study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    return run.info.run_id


def tag_child(client: MlflowClient, trial: FrozenTrial, state: TrialState) -> None:
    """The final state on the trial's MLflow run: complete, pruned or fail; feasibility."""
    run_id = trial.user_attrs.get("run_id")
    if run_id is None:
        return
    client.set_tag(run_id, "optuna_state", state.name.lower())
    if state == TrialState.COMPLETE:
        client.set_tag(run_id, "feasible", str(results.feasible(trial)).lower())


def record_failure(
    client: MlflowClient, experiment_id: str, parent: str, study: str, trial: FrozenTrial, reason: str
) -> None:
    """A FAILED child run for a trial that failed before its own run existed (a value its
    config checks rejected): every trial of the study shows in MLflow, with its reason."""
    run = client.create_run(
        experiment_id,
        run_name=f"t{trial.number} failed",
        tags={
            "mlflow.parentRunId": parent,
            "study_name": study,
            "trial_number": str(trial.number),
            "optuna_state": "fail",
            "error": redact(reason)[:5000],
        },
    )
    try:  # a stop (SIGTERM) in between still ends it: its trial is finished, nobody else would
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in trial.params.items()])
    finally:
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))


def _wait_for_user_attr(study: optuna.Study, key: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (value := study.user_attrs.get(key)) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return value  # None when its creator died before writing it: the caller opens its own
