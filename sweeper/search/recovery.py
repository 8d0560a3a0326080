"""Trials whose process died, was stopped or went silent: failed, their runs ended, re-queued.

A database storage keeps a heartbeat for each running trial (`Heartbeat`, from a
background thread): any controller fails the trials of a dead machine once their beats
stop, through Optuna's stale-trial callback. A trial left RUNNING by a process that kept no
heartbeat is failed when the next controller opens the study. A trial interrupted by a
signal is failed by its own controller on the way out. Each of them has its MLflow run
ended with the reason and its parameters queued again (`max_retries`).

Databases restart: `storage_retries` repeats a controller's storage call through an
outage instead of ending the sweep.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import optuna
import sqlalchemy.exc
from mlflow.tracking import MlflowClient
from optuna.storages._heartbeat import is_heartbeat_enabled  # not re-exported by optuna.storages
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)
WORKER_ATTR = "worker"  # host:pid of the controller running the trial (it keeps its heartbeat)
RETRIES_ATTR = "retries"
RETRY_OF_ATTR = "retry_of"  # the number of the failed trial a queued one repeats
ERROR_ATTR = "error"  # why a trial failed
OUTAGE = 300.0  # seconds a controller keeps retrying its storage through a database outage
T = TypeVar("T")
UNREACHABLE = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    optuna.exceptions.StorageInternalError,
)


class Recovery:
    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries
        self.client: MlflowClient | None = None  # set once the tracking server is known

    def retry(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        reason: str,
        status: str = "FAILED",
        quiet: bool = False,
    ) -> bool:
        """End the trial's MLflow run (`status`, with the reason) and queue its parameters again
        (said on the console unless `quiet`)."""
        run_id = trial.user_attrs.get("run_id")
        if run_id is not None and self.client is not None:
            self.client.set_tag(run_id, "error", reason)
            ended = self.client.get_run(run_id).info.status
            if ended == "RUNNING":
                self.client.set_terminated(run_id, status)
            if ended != "FINISHED":
                self._unregister(run_id)
        retries = trial.user_attrs.get(RETRIES_ATTR, 0)
        if retries >= self.max_retries:
            return False
        study.enqueue_trial(
            trial.params,
            user_attrs={RETRIES_ATTR: retries + 1, RETRY_OF_ATTR: trial.number},
            skip_if_exists=False,
        )
        log.log(
            logging.INFO if quiet else logging.WARNING,
            "trial %d (%s): re-queued with its parameters, retry %d",
            trial.number, reason, retries + 1,
        )  # fmt: skip
        return True

    def _unregister(self, run_id: str) -> None:
        """Versions the run registered before it was stopped (registering is its last step; a stop
        can fall between that and the run's end): a version's run must have finished."""
        for version in self.client.search_model_versions(f"run_id = '{run_id}'"):
            self.client.delete_model_version(version.name, version.version)
            log.info("version %s of %s removed: its run did not finish", version.version, version.name)

    def end_orphans(self, study: optuna.Study, experiment_id: str, parent: str) -> int:
        """End FAILED the RUNNING trial runs under `parent` whose trials are over: a worker that
        died while the tracking server or the database was down left its run open, and the retry
        runs under another trial. Runs of trials still running (here or elsewhere) are kept."""
        over = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        found = self.client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"
        )
        ended = 0
        for run in found:
            number = run.data.tags.get("trial_number")
            if number is not None and int(number) in over:
                self.client.set_tag(run.info.run_id, "error", "its trial was over: run ended by the sweep")
                self.client.set_terminated(run.info.run_id, "FAILED")
                self._unregister(run.info.run_id)
                ended += 1
        return ended

    def stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's heartbeat callback: a trial whose controller stopped beating was failed."""
        self.retry(study, trial, "its controller stopped sending heartbeats")

    def requeue_interrupted(self, study: optuna.Study) -> None:
        """Trials left RUNNING by a process that kept no heartbeat: fail and re-queue them.

        Trials with a heartbeat may belong to a live controller on another machine: Optuna
        fails those only once their heartbeat is stale.
        """
        beating = heartbeats_enabled(study)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if beating and WORKER_ATTR in trial.user_attrs:
                continue
            study.tell(trial.number, state=TrialState.FAIL)
            self.retry(study, trial, "left running by an earlier process")
        fail_stale(study)

    def interrupted(self, study: optuna.Study, trial_ids: list[int], reason: str) -> int:
        """This controller's running trials when a signal stopped it: failed (the reason kept),
        runs ended KILLED, parameters re-queued. Returns how many were re-queued."""
        requeued = 0
        for trial_id in trial_ids:
            trial = study._storage.get_trial(trial_id)
            if trial.state.is_finished():
                continue
            study._storage.set_trial_user_attr(trial_id, ERROR_ATTR, reason)
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            # The sweep's one line on stopping says so: "running trials failed and queued again".
            requeued += self.retry(study, trial, reason, status="KILLED", quiet=True)
        return requeued


def fail_stale(study: optuna.Study) -> None:
    """Fail (and, through `Recovery.stale`, re-queue) trials whose heartbeat stopped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def heartbeats_enabled(study: optuna.Study) -> bool:
    return is_heartbeat_enabled(study._storage)


def storage_retries(action: Callable[[], T], what: str, deadline: float = OUTAGE) -> T:
    """`action()`, repeated while the storage's database is unreachable (a restart, a
    failover), for up to `deadline` seconds; then its error."""
    give_up = time.monotonic() + deadline
    while True:
        try:
            return action()
        except UNREACHABLE as error:
            if time.monotonic() > give_up:
                raise
            log.warning("%s: storage unreachable, retrying (%s)", what, str(error).splitlines()[0])
            time.sleep(2.0)


class Heartbeat:
    """Records a heartbeat for each trial this controller runs, and fails (then re-queues,
    through the storage's callback) trials whose heartbeat stopped, from a background thread
    every `interval` s: a trial may run for an hour inside Hydra's launcher, and the
    controller's polling loop stays free of these queries."""

    def __init__(self, study: optuna.Study, interval: int) -> None:
        self.study = study
        self.storage = study._storage
        self.enabled = heartbeats_enabled(study)
        self.interval = interval
        self.trial_ids: set[int] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        if self.enabled:
            self.thread.start()

    def add(self, trial_id: int) -> None:
        self.trial_ids.add(trial_id)
        if self.enabled:
            self.storage.record_heartbeat(trial_id)

    def discard(self, trial_id: int) -> None:
        self.trial_ids.discard(trial_id)

    def stop(self) -> None:
        self.stopped.set()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            for trial_id in list(self.trial_ids):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as error:  # a database hiccup must not kill the sweep
                    log.warning("heartbeat of trial id %d failed: %s", trial_id, error)
            try:
                fail_stale(self.study)
            except Exception as error:
                log.warning("checking for stale trials failed: %s", error)
