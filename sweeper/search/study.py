"""The study controller behind our Hydra sweeper.

It checks the tracking server, then creates the Optuna storage, the study and its
MLflow parent run once, before any trial starts; then asks Optuna for trials and tells
it their outcomes. Trials run through Hydra's launcher in batches of `n_jobs` (one at a
time in-process by default; submitit's jobs on SLURM), or, with `n_jobs` > 1 on the
basic launcher, in asynchronous worker processes (workers.py). Every trial is the
`python -m sweeper` task with the sampled overrides, tracked as a child run.

Re-running the same command resumes the study, and the same command on other machines
joins it: `n_trials` is the total budget, counting trials running anywhere; finished
trials are never repeated. A database storage keeps a heartbeat for each running trial:
a trial whose process died is failed, its run ended FAILED, and its parameters queued
again (`max_retries`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import socket
import sys
import threading
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
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.storages._heartbeat import is_heartbeat_enabled  # not re-exported by optuna.storages
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from sweeper import devices, tracking
from sweeper.config import CONF_DIR, ConfigError, redact
from sweeper.search import grammar, results, workers
from sweeper.search.study_lock import StudyLock

log = logging.getLogger(__name__)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
PARENT_RUN_ATTR = "mlflow_parent_run_id"
WORKER_ATTR = "worker"  # host:pid of the controller running the trial (it keeps its heartbeat)
RETRIES_ATTR = "retries"
CONTROLLERS_ATTR = "controllers"  # how many controllers have opened the study: seeds their samplers
PARENT_RUN_WAIT = 60.0  # seconds a joining controller waits for the study's creator to open its run


@dataclass
class _Run:
    """One sweep's moving parts, handed to the trial loops."""

    study: optuna.Study
    space: dict[str, BaseDistribution]
    fixed: dict[str, str]
    n_trials: int
    storage: str  # the real URL, password included: the trials need it
    parent: str  # the MLflow parent run's id
    bar: tqdm
    heartbeat: Heartbeat
    lock: StudyLock  # held while counting the trials and asking for one


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
        self.max_retries = max_retries
        self.heartbeat_interval = heartbeat_interval
        self.client: MlflowClient | None = None
        self.finished = self.failures = 0  # this process's trials, for max_failure_rate

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)

    # ------------------------------------------------------------------ the sweep

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except (ConfigError, grammar.SearchSpaceError) as error:  # bad input: one line, nothing started
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    def _sweep(self, arguments: list[str]) -> None:
        cfg = self.config
        space, fixed = grammar.parse([f"{key}={value}" for key, value in self.params.items()] + arguments)
        grammar.check_keys([*space, *fixed], cfg)
        directions = self._directions(str(cfg.objective.mode.value))
        n_trials = min(self.n_trials, _grid_size(space)) if self._is_grid() else self.n_trials
        storage = self.storage or f"sqlite:///{Path.cwd() / self.study_name}.db"
        # The tracking server first: unreachable, the sweep stops before any storage or trial.
        experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
        lock = StudyLock(storage, self.study_name)
        with lock.held():  # of controllers started at once, exactly one makes tables and study
            study, created = self._open_study(storage, directions)
            controller = _controller_index(study)
        study.sampler = self._sampler(space, len(directions) == 1, controller)
        client = self.client = MlflowClient()
        shown = redact(storage)  # what may be printed or logged: no password
        parent = self._parent_run(client, study, created, experiment_id, shown, space, fixed)
        with lock.held():  # not between another controller's `ask` and its worker tag
            self._requeue_interrupted(study)
        log.info("study %s (%s): %d of %d trials done", self.study_name, shown, _done(study), n_trials)

        status = "FAILED"
        heartbeat = Heartbeat(study, self.heartbeat_interval)
        try:
            with tqdm(
                total=n_trials, initial=_done(study), desc=f"study {self.study_name}", unit="trial"
            ) as bar:
                execute = self._run_pool if self._asynchronous() else self._run_batches
                execute(_Run(study, space, fixed, n_trials, storage, parent, bar, heartbeat, lock))
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            heartbeat.stop()
            lock.close()
            summary = results.write(study, self.sweep_dir, cfg)
            results.log_to_parent(client, parent, study, summary, self.sweep_dir, cfg)
            client.set_terminated(parent, status)
        print(results.table(study, cfg, fixed, shown))

    def _run_batches(self, run: _Run) -> None:
        """Batches of `n_jobs` through Hydra's launcher (in-process, or submitit's jobs)."""
        job = 0
        while _done(run.study) < run.n_trials:
            with run.lock.held():
                left = run.n_trials - _committed(run.study)
                trials = [self._ask(run) for _ in range(min(self.n_jobs, left))]
            if not trials:  # the rest of the budget runs on other machines
                time.sleep(min(5, self.heartbeat_interval))
                continue
            batch = [self._overrides(run, trial) for trial in trials]
            returns = self.launcher.launch(batch, initial_job_idx=job)
            job += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                try:
                    outcome = ret.return_value  # raises the trial's exception
                except Exception as error:  # a failed trial: recorded, the study goes on
                    outcome = {"state": "fail", "error": f"{type(error).__name__}: {error}"}
                self._finish(run, trial, outcome)

    def _run_pool(self, run: _Run) -> None:
        """Asynchronous workers: a free worker takes the next trial at once, no batch barrier."""
        gpus = workers.visible_gpus(str(run.fixed.get("device", self.config.device)))
        slots = workers.plan(self.n_jobs, self.workers_per_gpu, gpus, devices.usable_cores())
        log.info(
            "%d workers: %s",
            len(slots),
            ", ".join(f"gpu {s.gpu}" if s.gpu else f"{s.threads} threads" for s in slots),
        )
        pool = workers.Pool(slots, self.sweep_dir / "workers", self.pruner, CONF_DIR)
        try:
            while _done(run.study) < run.n_trials:
                for slot in pool.idle():
                    with run.lock.held():
                        if _committed(run.study) >= run.n_trials:
                            break
                        trial = self._ask(run)
                    overrides = self._overrides(run, trial)
                    if "threads" not in run.fixed:  # the cores are shared between the workers
                        overrides.append(f"threads={slot.threads}")
                    pool.submit(slot, workers.Task(trial, overrides, self.sweep_dir / str(trial.number)))
                if not pool.running():  # the budget is taken by trials running elsewhere
                    time.sleep(min(5, self.heartbeat_interval))
                    continue
                for task, outcome in pool.wait(timeout=1.0):
                    if outcome is None:
                        outcome = {"state": "crash", "error": "its worker process died mid-trial"}
                    self._finish(run, task.key, outcome)
        finally:
            pool.close()

    def _finish(self, run: _Run, trial: optuna.Trial, outcome: dict[str, Any]) -> None:
        run.heartbeat.discard(trial._trial_id)
        study = run.study
        state = self._tell(study, trial, outcome)
        frozen = study.get_trials(deepcopy=False)[trial.number]  # trial numbers are positions
        self.finished += 1
        if state == TrialState.FAIL:
            log.warning("trial %d failed: %s", trial.number, outcome.get("error"))
            retried = outcome["state"] == "crash" and self._retry(study, frozen, outcome["error"])
            self.failures += not retried  # a crash that is retried is not the trial's fault
        _tag_child_run(self.client, frozen, state)
        run.bar.update(int(state in DONE))
        run.bar.set_postfix_str(_best_so_far(study))
        if self.failures > self.max_failure_rate * self.finished:
            raise RuntimeError(
                f"{self.failures} of {self.finished} trials failed "
                f"(hydra.sweeper.max_failure_rate={self.max_failure_rate})"
            )

    def _retry(self, study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
        """A trial whose process died: its MLflow run FAILED, its parameters queued again."""
        run_id = trial.user_attrs.get("run_id")
        if run_id is not None and self.client is not None:
            self.client.set_tag(run_id, "error", reason)
            self.client.set_terminated(run_id, "FAILED")
        retries = trial.user_attrs.get(RETRIES_ATTR, 0)
        if retries < self.max_retries:
            study.enqueue_trial(
                trial.params,
                user_attrs={RETRIES_ATTR: retries + 1, "retry_of": trial.number},
                skip_if_exists=False,
            )
            log.warning(
                "trial %d (%s): re-queued with its parameters, retry %d", trial.number, reason, retries + 1
            )
            return True
        return False

    def _stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's heartbeat callback: a trial whose controller stopped beating was failed."""
        self._retry(study, trial, "its controller stopped sending heartbeats")

    def _asynchronous(self) -> bool:
        many = self.n_jobs > 1 or self.workers_per_gpu is not None
        return many and type(self.launcher).__name__ == "BasicLauncher"

    def _storage(self, url: str) -> Any:
        """An RDB storage keeps heartbeats of running trials, so dead workers are noticed."""
        if not url.startswith(("sqlite", "postgresql", "mysql")):
            return url
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=self.heartbeat_interval,
                grace_period=3 * self.heartbeat_interval,
                heartbeat_stale_trial_callback=self._stale,
            )

    def _requeue_interrupted(self, study: optuna.Study) -> None:
        """Trials left RUNNING by a process that kept no heartbeat: fail and re-queue them.

        Trials with a heartbeat may belong to a live controller on another machine: Optuna
        fails those only once their heartbeat is stale.
        """
        beating = _heartbeats(study)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if beating and WORKER_ATTR in trial.user_attrs:
                continue
            study.tell(trial.number, state=TrialState.FAIL)
            self._retry(study, trial, "left running by an earlier process")
        _fail_stale(study)

    def _ask(self, run: _Run) -> optuna.Trial:
        trial = run.study.ask(run.space)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        run.heartbeat.add(trial._trial_id)
        if self.extend_space is not None:
            self.extend_space(self.config, trial)
        return trial

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.Trial, outcome: dict[str, Any]) -> TrialState:
        if outcome["state"] == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED
        if outcome["state"] in ("fail", "crash"):
            study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
        trial.set_user_attr("constraints", outcome["constraints"])
        trial.set_user_attr("metrics", outcome["metrics"])
        study.tell(trial, values=outcome["values"])
        return TrialState.COMPLETE

    def _overrides(self, run: _Run, trial: optuna.Trial) -> list[str]:
        return grammar.overrides(trial.params, run.fixed) + [
            f"sweep.study_name={self.study_name}",
            f"sweep.storage='{run.storage}'",
            f"sweep.trial_number={trial.number}",
            f"sweep.trial_id={trial._trial_id}",
            f"sweep.parent_run_id={run.parent}",
        ]

    # ------------------------------------------------------------------ set-up

    def _directions(self, mode: str) -> list[str]:
        directions = list(self.direction) if isinstance(self.direction, list | tuple) else [self.direction]
        directions = [str(getattr(d, "name", d)) for d in directions]
        wanted = 2 if mode == "pareto" else 1
        if len(directions) == 1:
            directions *= wanted
        if len(directions) != wanted:
            raise grammar.SearchSpaceError(
                f"hydra.sweeper.direction: {len(directions)} directions "
                f"for objective={mode} ({wanted} objectives)"
            )
        return directions

    def _is_grid(self) -> bool:
        factory = self.sampler_factory
        return isinstance(factory, functools.partial) and factory.func is optuna.samplers.GridSampler

    def _sampler(
        self, space: dict[str, BaseDistribution], constrained: bool, controller: int = 0
    ) -> optuna.samplers.BaseSampler:
        """The configured sampler, seeded `seed + controller`: the n-th controller to open the
        study (a resume, or another machine joining) does not replay the draws of the
        others, and one machine's runs stay deterministic."""
        factory = self.sampler_factory
        if not isinstance(factory, functools.partial):
            return factory  # already an instance (a user's own config without _partial_)
        keywords = dict(factory.keywords)
        if controller and keywords.get("seed") is not None:
            keywords["seed"] += controller
        if self._is_grid():
            grid = {key: _grid_values(key, d) for key, d in space.items()}
            return _Grid(*factory.args, **{**keywords, "search_space": grid})
        accepts = inspect.signature(factory.func).parameters
        if constrained and "constraints_func" in accepts:
            keywords["constraints_func"] = results.constraints
        return factory.func(*factory.args, **keywords)

    def _open_study(self, storage: str, directions: list[str]) -> tuple[optuna.Study, bool]:
        """The study, and whether this controller created it (call it under the study lock)."""
        settings = {"study_name": self.study_name, "storage": self._storage(storage), "pruner": self.pruner}
        try:
            return optuna.create_study(directions=directions, **settings), True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(**settings), False

    def _parent_run(
        self,
        client: MlflowClient,
        study: optuna.Study,
        created: bool,
        experiment_id: str,
        storage: str,
        space: dict[str, BaseDistribution],
        fixed: dict[str, str],
    ) -> str:
        """One parent run per study: opened by the controller that created the study,
        reopened when the study resumes."""
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is None and not created:  # its creator, maybe on another machine, opens it now
            run_id = _wait_for_user_attr(study, PARENT_RUN_ATTR, PARENT_RUN_WAIT)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return run_id
        run = client.create_run(
            experiment_id,
            run_name=f"study {self.study_name}",
            tags={"study_name": self.study_name, "optuna_storage": storage, "role": "study"},
        )
        settings = {
            "study_name": self.study_name,
            "n_trials": self.n_trials,
            "n_jobs": self.n_jobs,
            "sampler": type(study.sampler).__name__,
            "directions": ",".join(d.name.lower() for d in study.directions),
            "objective": OmegaConf.to_yaml(self.config.objective).strip().replace("\n", "; "),
        }
        settings |= {f"space.{key}": repr(d) for key, d in space.items()}
        settings |= {f"fixed.{key}": value for key, value in fixed.items()}
        for key, value in settings.items():
            client.log_param(run.info.run_id, key, str(value)[:6000])
        study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
        return run.info.run_id


class _Grid(optuna.samplers.GridSampler):
    """GridSampler without its `study.stop()` when the grid is done: that raises outside
    `study.optimize()`, and our loop already stops at the grid's size."""

    def after_trial(self, study: Any, trial: Any, state: TrialState, values: Any) -> None:
        pass


def _tag_child_run(client: MlflowClient, trial: FrozenTrial, state: TrialState) -> None:
    """The final state on the trial's MLflow run: complete, pruned or fail; feasibility."""
    run_id = trial.user_attrs.get("run_id")
    if run_id is None:
        return  # failed before its run started (bad input): there is nothing to tag
    client.set_tag(run_id, "optuna_state", state.name.lower())
    if state == TrialState.COMPLETE:
        client.set_tag(run_id, "feasible", str(results.feasible(trial)).lower())


def _best_so_far(study: optuna.Study) -> str:
    best = results.best_trials(study)
    if len(study.directions) > 1:
        return f"{len(best)} on the Pareto front"
    return f"best {best[0].value:.4g} (trial {best[0].number})" if best else "no feasible trial yet"


def _controller_index(study: optuna.Study) -> int:
    """How many controllers opened the study before this one (call it under the study lock)."""
    index = study.user_attrs.get(CONTROLLERS_ATTR, 0)
    study.set_user_attr(CONTROLLERS_ATTR, index + 1)
    return index


def _wait_for_user_attr(study: optuna.Study, key: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (value := study.user_attrs.get(key)) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return value  # None when its creator died before writing it: the caller opens its own


def _done(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE))


def _committed(study: optuna.Study) -> int:
    """Trials that count against the budget: done, or running here or on another machine."""
    return len(study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING)))


def _fail_stale(study: optuna.Study) -> None:
    """Fail (and, through `_stale`, re-queue) trials whose heartbeat stopped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _heartbeats(study: optuna.Study) -> bool:
    return is_heartbeat_enabled(study._storage)


class Heartbeat:
    """Records a heartbeat for each trial this controller runs, and fails (then re-queues,
    through the storage's callback) trials whose heartbeat stopped, from a background thread
    every `interval` s: a trial may run for an hour inside Hydra's launcher, and the
    controller's polling loop stays free of these queries."""

    def __init__(self, study: optuna.Study, interval: int) -> None:
        self.study = study
        self.storage = study._storage
        self.enabled = _heartbeats(study)
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
                _fail_stale(self.study)
            except Exception as error:
                log.warning("checking for stale trials failed: %s", error)


def _grid_values(key: str, distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    raise grammar.SearchSpaceError(
        f"{key}: the grid sampler needs choices or integer ranges, got {distribution}"
    )


def _grid_size(space: dict[str, BaseDistribution]) -> int:
    size = 1
    for key, distribution in space.items():
        size *= len(_grid_values(key, distribution))
    return size
