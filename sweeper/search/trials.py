"""One sweep's trials as the executors see them (executors.Trials): the budget, asking, telling.

`ask` takes new trials from the study under the study lock, counting the trials running on
other machines against the budget. `finish` tells Optuna a trial's outcome (`tell`), tags its
MLflow run, prints its line under the progress bar and applies the failure policy
(`FailureRate`): a crashed trial is queued again (recovery.py) and is not the trial's fault.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState
from tqdm import tqdm

from sweeper.objective import Goal
from sweeper.search import grammar, grid, parent_run, results
from sweeper.search.membership import Membership
from sweeper.search.recovery import ERROR_ATTR, WORKER_ATTR, Heartbeat, Recovery, storage_retries
from sweeper.search.study_lock import StudyLock

log = logging.getLogger(__name__)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
MIN_FINISHED_FOR_FAILURE_RATE = 4  # one early failure does not stop a sweep


@dataclass
class FailureRate:
    """The sweep stops when more than `max_rate` of this controller's finished trials failed,
    once a few have finished (at the first failure with a rate of 0)."""

    max_rate: float
    finished: int = 0
    failures: int = 0

    def count(self, failed: bool) -> None:
        self.finished += 1
        self.failures += failed

    def check(self) -> None:
        if self.failures == 0 or self.failures <= self.max_rate * self.finished:
            return
        if self.max_rate == 0 or self.finished >= MIN_FINISHED_FOR_FAILURE_RATE:
            raise RuntimeError(
                f"{self.failures} of {self.finished} trials failed "
                f"(hydra.sweeper.max_failure_rate={self.max_rate})"
            )


@dataclass
class Trials:
    """One sweep's trials: what they search and fix, their budget, where they are tracked."""

    study: optuna.Study
    space: dict[str, BaseDistribution]
    fixed: dict[str, str]  # keys the sweep fixes (a trial's overrides carry them)
    n_trials: int
    goal: Goal
    client: MlflowClient
    experiment_id: str
    parent: str  # the MLflow parent run's id
    recovery: Recovery
    lock: StudyLock  # held while counting the trials and asking for one
    heartbeat: Heartbeat
    failure_rate: FailureRate
    grid: bool = False  # the budget counts cells tried, failed ones included (grid.py)
    suggest: Callable[[optuna.Trial], None] | None = None  # a user's custom_search_space
    running: dict[int, float] = field(default_factory=dict)  # this controller's (storage id -> when asked)
    bar: tqdm | None = None  # while `progress` shows it

    def done(self) -> int:
        return storage_retries(lambda: finished(self.study, self.grid), "counting finished trials")

    def committed(self) -> int:
        """Trials that count against the budget: done, or running here or on another machine."""
        return finished(self.study, self.grid) + _count(self.study, (TrialState.RUNNING,))

    @contextlib.contextmanager
    def progress(self, done: int) -> Iterator[None]:
        """The progress bar that `finish` updates (one line per trial above it), from `done`."""
        name = self.study.study_name
        with tqdm(total=self.n_trials, initial=done, desc=f"study {name}", unit="trial") as bar:
            self.bar = bar
            try:
                yield
            finally:
                self.bar = None

    def ask(self, count: int) -> list[optuna.Trial]:
        """Up to `count` new trials, as many as the budget has left (under the study lock)."""
        with self.lock.held():
            left = self.n_trials - self.committed()
            return [self._ask() for _ in range(min(count, left))]

    def _ask(self) -> optuna.Trial:
        trial = self.study.ask(self.space)
        self.running[trial._trial_id] = time.monotonic()
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        self.heartbeat.add(trial._trial_id)
        if self.suggest is not None:
            self.suggest(trial)
        return trial

    def overrides(self, trial: optuna.Trial) -> list[str]:
        """A trial's Hydra overrides; the storage URL stays out of them (and out of every
        file and log Hydra writes): the trial reads it from the environment (membership.py)."""
        member = Membership(self.study.study_name, trial.number, trial._trial_id, self.parent)
        return grammar.overrides(trial.params, self.fixed) + member.overrides()

    def finish(self, trial: optuna.Trial, outcome: dict[str, Any]) -> None:
        """Tell Optuna, tag the MLflow run, print the trial's line, and watch the failure rate."""
        self.heartbeat.discard(trial._trial_id)
        study = self.study
        state = storage_retries(
            lambda: tell(study, trial, outcome, self.client, pareto=self.goal.pareto),
            f"telling trial {trial.number}",
        )
        frozen = study._storage.get_trial(trial._trial_id)
        retried = False
        if outcome["state"] in ("fail", "crash"):
            log.warning("trial %d failed: %s", trial.number, outcome.get("error"))
            retried = outcome["state"] == "crash" and self.recovery.retry(study, frozen, outcome["error"])
            self.failure_rate.count(failed=not retried)  # a crash that is retried is not the trial's fault
            if "run_id" not in frozen.user_attrs:  # failed before its run existed: record it in MLflow
                parent_run.record_failure(
                    self.client, self.experiment_id, self.parent, study.study_name, frozen, outcome["error"]
                )
        else:
            self.failure_rate.count(failed=False)
        parent_run.tag_child(self.client, frozen, state)
        seconds = time.monotonic() - self.running.pop(trial._trial_id, time.monotonic())
        if self.bar is not None:
            self.bar.write(results.trial_line(frozen, self.goal, seconds))
            self.bar.update(int(state in DONE or (self.grid and not retried and state == TrialState.FAIL)))
            self.bar.set_postfix_str(_best_so_far(study))
        self.failure_rate.check()

    def interrupted(self, reason: str) -> None:
        """A signal stops the sweep: this controller's running trials are failed and queued again."""
        self.recovery.interrupted(self.study, list(self.running), reason)


def tell(
    study: optuna.Study, trial: optuna.Trial, outcome: dict[str, Any], client: MlflowClient, *, pareto: bool
) -> TrialState:
    """The outcome to Optuna; a trial already finished elsewhere (failed as stale while its
    worker still ran) keeps its state: the late result stays in MLflow only."""
    if (stored := study._storage.get_trial(trial._trial_id).state).is_finished():
        log.warning(
            "trial %d finished after it was failed as stale: its result stays in MLflow", trial.number
        )
        if (run_id := outcome.get("run_id")) is not None:
            client.set_tag(run_id, "late_result", "true")
        return stored
    if outcome["state"] == "pruned":
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        return TrialState.PRUNED
    if outcome["state"] in ("fail", "crash"):
        trial.set_user_attr(ERROR_ATTR, str(outcome.get("error"))[:2000])
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        return TrialState.FAIL
    trial.set_user_attr("constraints", outcome["constraints"])
    # Pareto mode keeps the retained error as an objective, not also as a constraint.
    for index, value in enumerate([] if pareto else outcome["constraints"]):
        trial.set_constraint(str(index), value)  # what Optuna 5's samplers read
    trial.set_user_attr("metrics", outcome["metrics"])
    study.tell(trial, values=outcome["values"], skip_if_finished=True)
    return TrialState.COMPLETE


def finished(study: optuna.Study, is_grid: bool) -> int:
    """Trials finished for good; in a grid sweep, cells tried (a failed cell is not asked again)."""
    return grid.tried(study.get_trials(deepcopy=False)) if is_grid else _count(study, DONE)


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _best_so_far(study: optuna.Study) -> str:
    best = results.best_trials(study)
    if len(study.directions) > 1:
        return f"{len(best)} on the Pareto front"
    return f"best {best[0].value:.4g} (trial {best[0].number})" if best else "no feasible trial yet"
