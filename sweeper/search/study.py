"""The study controller behind our Hydra sweeper: a short orchestrator, top to bottom.

`sweep` reads the search space and decides the objective from the data (space.py,
objective.py), checks the tracking server, then creates the Optuna storage, the study
(its fingerprint checked, identity.py) and its MLflow parent run (parent_run.py) once,
before any trial starts; then hands the sweep's trials (trials.py: asking Optuna, telling it
outcomes, the failure policy) to an executor: Hydra's launcher in batches of `n_jobs`, or
asynchronous worker processes (executors.py, workers.py). Every trial is the
`python -m sweeper` task with the sampled overrides, tracked as a child run.

Re-running the same command resumes the study, and the same command on other machines
joins it: `n_trials` is the total budget, counting trials running anywhere; finished
trials are never repeated. Crashed, stopped and silent trials are failed, their runs
ended and their parameters queued again (recovery.py). SIGINT and SIGTERM stop the sweep
within seconds with nothing left RUNNING; the storage URL travels to the trials in an
environment variable, never in an override, a log or a file.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from tqdm.contrib.logging import logging_redirect_tqdm

from sweeper import objective, secrets, tracking
from sweeper.config import ConfigError
from sweeper.rules import check as check_values
from sweeper.search import executors, grammar, grid, identity, parent_run, results, samplers, space
from sweeper.search import storage as study_storage
from sweeper.search.membership import STORAGE_ENV
from sweeper.search.recovery import Heartbeat, Recovery
from sweeper.search.study_lock import StudyLock
from sweeper.search.trials import FailureRate, Trials, finished
from sweeper.secrets import redact
from sweeper.signals import Terminated, exit_code, terminate_as_exception

log = logging.getLogger(__name__)
# We keep heartbeats ourselves, outside Study.optimize (recovery.Heartbeat).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


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
        goal = objective.goal(trial_cfg)
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
            directions = study_storage.directions(self.direction, goal.pareto)
            study, created = study_storage.open_study(self.study_name, rdb, directions, self.pruner)
            identity.check(study, fingerprint, shown)
            controller = samplers.controller_index(study)
        study.sampler = samplers.build(self.sampler_factory, searched, controller)
        client = self.recovery.client = MlflowClient()
        parent = parent_run.open_run(
            client, study, created, experiment_id, storage, self._settings(study, goal, searched, fixed)
        )
        with lock.held():  # not between another controller's `ask` and its worker tag
            self.recovery.requeue_interrupted(study)
            if cells:
                grid.requeue_failed(study)  # once per run of the command: their cause may be fixed
        done = finished(study, bool(cells))
        print(f"study {self.study_name} ({shown}): {done} of {n_trials} trials done; {goal.describe()}")

        status = "FAILED"
        heartbeat = Heartbeat(study, self.heartbeat_interval)
        trials = Trials(
            study=study,
            space=searched,
            fixed=fixed,
            n_trials=n_trials,
            goal=goal,
            client=client,
            experiment_id=experiment_id,
            parent=parent,
            recovery=self.recovery,
            lock=lock,
            heartbeat=heartbeat,
            failure_rate=FailureRate(self.max_failure_rate),
            grid=bool(cells),
            suggest=functools.partial(self.extend_space, cfg) if self.extend_space is not None else None,
        )
        try:
            with trials.progress(done), logging_redirect_tqdm():  # warnings print above the bar
                idle = min(5, self.heartbeat_interval)
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
            trials.interrupted(f"interrupted: {stop or 'Ctrl-C'}")
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

    def scrub_hydra_files(self) -> None:
        """Hydra writes the command line into .hydra/*.yaml and multirun.yaml: no password there."""
        secrets.scrub_hydra_files(self.sweep_dir)

    # ------------------------------------------------------------------ set-up

    def _is_grid(self) -> bool:
        return samplers.is_grid(self.sampler_factory)

    def _asynchronous(self) -> bool:
        many = self.n_jobs > 1 or self.workers_per_gpu is not None
        return many and type(self.launcher).__name__ == "BasicLauncher"

    def _settings(
        self, study: optuna.Study, goal: objective.Goal, searched: dict, fixed: dict[str, str]
    ) -> dict[str, Any]:
        """The parent run's params: how the study searches and what it fixes."""
        settings = {
            "study_name": self.study_name,
            "n_trials": self.n_trials,
            "n_jobs": self.n_jobs,
            "sampler": samplers.describe(self.sampler_factory),
            "directions": ",".join(d.name.lower() for d in study.directions),
            "objective": goal.describe(),
        }
        settings |= {f"space.{key}": repr(d) for key, d in searched.items()}
        return settings | {f"fixed.{key}": value for key, value in fixed.items()}
