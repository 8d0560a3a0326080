"""The study controller behind our Hydra sweeper: a short orchestrator, top to bottom.

`sweep` reads the search space and decides the objective from the data (space.py,
objective.py), checks the tracking server, then creates the Optuna storage, the study
(its fingerprint checked, identity.py) and its MLflow parent run (parent_run.py) once,
before any trial starts; then asks Optuna for trials and tells it their outcomes. Trials
run through Hydra's launcher in batches of `n_jobs`, or in asynchronous worker processes
(executors.py, workers.py). Every trial is the `python -m sweeper` task with the sampled
overrides, tracked as a child run.

Re-running the same command resumes the study, and the same command on other machines
joins it: `n_trials` is the total budget, counting trials running anywhere; finished
trials are never repeated. Crashed, stopped and silent trials are failed, their runs
ended and their parameters queued again (recovery.py). SIGINT and SIGTERM stop the sweep
within seconds with nothing left RUNNING; the storage URL travels to the trials in an
environment variable, never in an override, a log or a file.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sweeper import objective, secrets, tracking
from sweeper.config import ConfigError
from sweeper.config import check as check_values
from sweeper.search import executors, grammar, grid, identity, parent_run, results, samplers, space
from sweeper.search import storage as study_storage
from sweeper.search.membership import STORAGE_ENV, Membership
from sweeper.search.recovery import ERROR_ATTR, WORKER_ATTR, Heartbeat, Recovery, storage_retries
from sweeper.search.study_lock import StudyLock
from sweeper.secrets import redact
from sweeper.signals import Terminated, exit_code, terminate_as_exception

log = logging.getLogger(__name__)
# We keep heartbeats ourselves, outside Study.optimize (recovery.Heartbeat).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
MIN_FINISHED_FOR_FAILURE_RATE = 4  # one early failure does not stop a sweep


@dataclass
class Run:
    """One sweep's moving parts, handed to the executors."""

    study: optuna.Study
    space: dict[str, BaseDistribution]
    fixed: dict[str, str]
    n_trials: int
    parent: str  # the MLflow parent run's id
    experiment_id: str
    bar: tqdm
    heartbeat: Heartbeat
    lock: StudyLock  # held while counting the trials and asking for one
    grid: bool = False  # the budget counts cells tried, failed ones included (grid.py)

    def done(self) -> int:
        return storage_retries(lambda: _done(self.study, self.grid), "counting finished trials")

    def committed(self) -> int:
        """Trials that count against the budget: done, or running here or on another machine."""
        return _done(self.study, self.grid) + _count(self.study, (TrialState.RUNNING,))


@dataclass
class _Trials:
    """This sweep as the executors see it (executors.Trials): the budget, asking, telling."""

    sweeper: StudySweeper
    run: Run

    @property
    def n_trials(self) -> int:
        return self.run.n_trials

    @property
    def fixed(self) -> dict[str, str]:
        return self.run.fixed

    def done(self) -> int:
        return self.run.done()

    def ask(self, count: int) -> list[optuna.Trial]:
        return self.sweeper.ask_batch(self.run, count)

    def overrides(self, trial: optuna.Trial) -> list[str]:
        return self.sweeper.overrides(self.run, trial)

    def finish(self, trial: optuna.Trial, outcome: dict[str, Any]) -> None:
        self.sweeper.finish(self.run, trial, outcome)


class StudySweeper:
    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: Any,
        storage: str | None,
        study_name: str,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: dict[str, str] | None,
        custom_search_space: str | None,
        workers_per_gpu: int | None = None,
        max_retries: int = 2,
        heartbeat_interval: int = 30,
    ) -> None:
        self.sampler_factory = sampler
        self.pruner = pruner if pruner is not None else optuna.pruners.NopPruner()
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = max(1, n_jobs)
        self.max_failure_rate = max_failure_rate
        self.params = dict(params or {})
        # "module.function": called as function(cfg, trial) to suggest more parameters.
        self.extend_space = get_method(custom_search_space) if custom_search_space else None
        self.workers_per_gpu = workers_per_gpu
        self.heartbeat_interval = heartbeat_interval
        self.recovery = Recovery(max_retries)
        self.finished = self.failures = 0  # this process's trials, for max_failure_rate
        self.running: dict[int, float] = {}  # this controller's trials (storage id) -> when asked

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)

    # ------------------------------------------------------------------ the sweep

    def sweep(self, arguments: list[str]) -> None:
        try:
            with terminate_as_exception():
                self._sweep(arguments)
        except (ConfigError, grammar.SearchSpaceError) as error:  # bad input: one line, nothing started
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except (KeyboardInterrupt, Terminated) as stop:
            print(
                f"\nsweep stopped ({stop or 'Ctrl-C'}): running trials failed and queued again; "
                "the same command resumes",
                file=sys.stderr,
            )
            sys.exit(exit_code(stop))

    def _sweep(self, arguments: list[str]) -> None:
        cfg = self.config
        secrets.redact_config(cfg)  # what the launcher copies into every job: no password
        searched, fixed = grammar.parse([f"{key}={value}" for key, value in self.params.items()] + arguments)
        grammar.check_keys([*searched, *fixed], cfg)
        # What the trials will see and be judged by, before any study or trial exists.
        trial_cfg = self.hydra_context.config_loader.load_sweep_config(cfg, grammar.overrides({}, fixed))
        check_values(trial_cfg)
        space.check_bounds(searched, trial_cfg)
        goal = self.goal = objective.goal(trial_cfg)
        objective.check_pruning(goal, trial_cfg, not isinstance(self.pruner, optuna.pruners.NopPruner))
        fingerprint = identity.of(trial_cfg, goal, searched)
        cells = space.grid_size(searched) if self._is_grid() else None
        n_trials = min(self.n_trials, cells) if cells else self.n_trials
        storage = self.storage or f"sqlite:///{Path.cwd() / self.study_name}.db"
        shown = redact(storage)  # what may be printed or logged: no password
        os.environ[STORAGE_ENV] = storage  # the trials' way to it (workers and jobs inherit it)
        # The tracking server first: unreachable, the sweep stops before any storage or trial.
        experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
        lock = StudyLock(storage, self.study_name)
        with lock.held():  # of controllers started at once, exactly one makes tables and study
            rdb = study_storage.rdb(storage, self.heartbeat_interval, self.recovery.stale)
            directions = self._directions(goal)
            study, created = study_storage.open_study(self.study_name, rdb, directions, self.pruner)
            identity.check(study, fingerprint, shown)
            controller = samplers.controller_index(study)
        study.sampler = samplers.build(self.sampler_factory, searched, controller)
        client = self.recovery.client = self.client = MlflowClient()
        parent = parent_run.open_run(
            client, study, created, experiment_id, storage, self._settings(study, searched, fixed)
        )
        with lock.held():  # not between another controller's `ask` and its worker tag
            self.recovery.requeue_interrupted(study)
            if cells:
                grid.requeue_failed(study)  # once per run of the command: their cause may be fixed
        done = _done(study, bool(cells))
        print(f"study {self.study_name} ({shown}): {done} of {n_trials} trials done; {goal.describe()}")

        status = "FAILED"
        heartbeat = Heartbeat(study, self.heartbeat_interval)
        try:
            with (
                tqdm(total=n_trials, initial=done, desc=f"study {self.study_name}", unit="trial") as bar,
                logging_redirect_tqdm(),  # warnings print above the bar, not through it
            ):
                run = Run(
                    study, searched, fixed, n_trials, parent, experiment_id, bar, heartbeat, lock, bool(cells)
                )
                trials, idle = _Trials(self, run), min(5, self.heartbeat_interval)
                if self._asynchronous():
                    settings = executors.Workers(
                        self.n_jobs,
                        self.workers_per_gpu,
                        str(self.config.device),
                        self.sweep_dir,
                        self.pruner,
                    )
                    executors.in_pool(trials, settings, idle)
                else:
                    executors.in_batches(trials, self.launcher, self.n_jobs, idle, self.scrub_hydra_files)
            status = "FINISHED"
        except (KeyboardInterrupt, Terminated) as stop:
            status = "KILLED"
            self.recovery.interrupted(study, list(self.running), f"interrupted: {stop or 'Ctrl-C'}")
            raise
        finally:
            heartbeat.stop()
            lock.close()
            if status == "FINISHED":
                self._end_orphans(study, experiment_id, parent)
            summary = results.write(study, self.sweep_dir, goal)
            results.log_to_parent(client, parent, study, summary, self.sweep_dir, goal)
            client.set_terminated(parent, status)
            self.scrub_hydra_files()
            study_storage.release(study)
        print(results.table(study, goal, fixed))
        if cells and (failed_cells := grid.report(study.trials, cells)):
            print(failed_cells)
        print(results.hints(study, cfg, experiment_id, parent, shown))

    def _end_orphans(self, study: optuna.Study, experiment_id: str, parent: str) -> None:
        """Runs left open by an outage are ended; a failure here never fails the sweep's end."""
        try:
            if ended := self.recovery.end_orphans(study, experiment_id, parent):
                log.info("%d trial runs left RUNNING by an outage ended FAILED", ended)
        except Exception as error:  # an outage now: the next controller to finish ends them
            log.info("open trial runs not checked (%s: %s)", type(error).__name__, error)

    # ------------------------------------------------------------------ trials

    def ask_batch(self, run: Run, count: int) -> list[optuna.Trial]:
        """Up to `count` new trials, as many as the budget has left (under the study lock)."""
        with run.lock.held():
            left = run.n_trials - run.committed()
            return [self._ask(run) for _ in range(min(count, left))]

    def _ask(self, run: Run) -> optuna.Trial:
        trial = run.study.ask(run.space)
        self.running[trial._trial_id] = time.monotonic()
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        run.heartbeat.add(trial._trial_id)
        if self.extend_space is not None:
            self.extend_space(self.config, trial)
        return trial

    def overrides(self, run: Run, trial: optuna.Trial) -> list[str]:
        """A trial's Hydra overrides; the storage URL stays out of them (and out of every
        file and log Hydra writes): the trial reads it from the environment."""
        member = Membership(self.study_name, trial.number, trial._trial_id, run.parent)
        return grammar.overrides(trial.params, run.fixed) + member.overrides()

    def finish(self, run: Run, trial: optuna.Trial, outcome: dict[str, Any]) -> None:
        """Tell Optuna, tag the MLflow run, print the trial's line, and watch the failure rate."""
        run.heartbeat.discard(trial._trial_id)
        study = run.study
        state = storage_retries(lambda: self._tell(study, trial, outcome), f"telling trial {trial.number}")
        frozen = study._storage.get_trial(trial._trial_id)
        self.finished += 1
        retried = False
        if outcome["state"] in ("fail", "crash"):
            log.warning("trial %d failed: %s", trial.number, outcome.get("error"))
            retried = outcome["state"] == "crash" and self.recovery.retry(study, frozen, outcome["error"])
            self.failures += not retried  # a crash that is retried is not the trial's fault
            if "run_id" not in frozen.user_attrs:  # failed before its run existed: record it in MLflow
                parent_run.record_failure(
                    self.client, run.experiment_id, run.parent, self.study_name, frozen, outcome["error"]
                )
        parent_run.tag_child(self.client, frozen, state)
        seconds = time.monotonic() - self.running.pop(trial._trial_id, time.monotonic())
        run.bar.write(results.trial_line(frozen, self.goal, seconds))
        run.bar.update(int(state in DONE or (run.grid and not retried and state == TrialState.FAIL)))
        run.bar.set_postfix_str(_best_so_far(study))
        if self._too_many_failures():
            raise RuntimeError(
                f"{self.failures} of {self.finished} trials failed "
                f"(hydra.sweeper.max_failure_rate={self.max_failure_rate})"
            )

    def _tell(self, study: optuna.Study, trial: optuna.Trial, outcome: dict[str, Any]) -> TrialState:
        """The outcome to Optuna; a trial already finished elsewhere (failed as stale while its
        worker still ran) keeps its state: the late result stays in MLflow only."""
        if (stored := study._storage.get_trial(trial._trial_id).state).is_finished():
            log.warning(
                "trial %d finished after it was failed as stale: its result stays in MLflow", trial.number
            )
            if (run_id := outcome.get("run_id")) is not None:
                self.client.set_tag(run_id, "late_result", "true")
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
        for index, value in enumerate([] if self.goal.pareto else outcome["constraints"]):
            trial.set_constraint(str(index), value)  # what Optuna 5's samplers read
        trial.set_user_attr("metrics", outcome["metrics"])
        study.tell(trial, values=outcome["values"], skip_if_finished=True)
        return TrialState.COMPLETE

    def _too_many_failures(self) -> bool:
        """More than `max_failure_rate` of the finished trials failed, once a few have finished
        (at the first failure with a rate of 0)."""
        if self.failures == 0 or self.failures <= self.max_failure_rate * self.finished:
            return False
        return self.max_failure_rate == 0 or self.finished >= MIN_FINISHED_FOR_FAILURE_RATE

    def scrub_hydra_files(self) -> None:
        """Hydra writes the command line into .hydra/*.yaml and multirun.yaml: no password there."""
        secrets.scrub_hydra_files(self.sweep_dir)

    # ------------------------------------------------------------------ set-up

    def _directions(self, goal: objective.Goal) -> list[str]:
        mode = "pareto" if goal.pareto else "constrained"
        directions = list(self.direction) if isinstance(self.direction, list | tuple) else [self.direction]
        directions = [str(getattr(d, "name", d)) for d in directions]
        wanted = 2 if goal.pareto else 1
        if len(directions) == 1:
            directions *= wanted
        if len(directions) != wanted:
            raise grammar.SearchSpaceError(
                f"hydra.sweeper.direction: {len(directions)} directions for objective={mode} "
                f"({wanted} objectives)"
            )
        return directions

    def _is_grid(self) -> bool:
        return samplers.is_grid(self.sampler_factory)

    def _asynchronous(self) -> bool:
        many = self.n_jobs > 1 or self.workers_per_gpu is not None
        return many and type(self.launcher).__name__ == "BasicLauncher"

    def _settings(self, study: optuna.Study, searched: dict, fixed: dict[str, str]) -> dict[str, Any]:
        """The parent run's params: how the study searches and what it fixes."""
        settings = {
            "study_name": self.study_name,
            "n_trials": self.n_trials,
            "n_jobs": self.n_jobs,
            "sampler": samplers.describe(self.sampler_factory),
            "directions": ",".join(d.name.lower() for d in study.directions),
            "objective": self.goal.describe(),
        }
        settings |= {f"space.{key}": repr(d) for key, d in searched.items()}
        return settings | {f"fixed.{key}": value for key, value in fixed.items()}


def _done(study: optuna.Study, is_grid: bool) -> int:
    """Trials finished for good; in a grid sweep, cells tried (a failed cell is not asked again)."""
    return grid.tried(study.get_trials(deepcopy=False)) if is_grid else _count(study, DONE)


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _best_so_far(study: optuna.Study) -> str:
    best = results.best_trials(study)
    if len(study.directions) > 1:
        return f"{len(best)} on the Pareto front"
    return f"best {best[0].value:.4g} (trial {best[0].number})" if best else "no feasible trial yet"
