"""The two ways trials run: Hydra's launcher in batches, or our own asynchronous workers.

Both take trials from the study (`Trials.ask`, counted against the budget under the study
lock), run them, and hand each outcome back (`Trials.finish`). They know the study only
through that small interface (trials.py; study.py hands them one), and everything else as
arguments.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna

from sweeper import devices
from sweeper.config import CONF_DIR
from sweeper.search import workers
from sweeper.search.recovery import storage_retries


class Trials(Protocol):
    """What an executor needs of the study: its budget, new trials, and where outcomes go."""

    n_trials: int
    fixed: dict[str, str]  # keys the sweep fixes (a trial's overrides carry them)

    def done(self) -> int: ...

    def ask(self, count: int) -> list[optuna.Trial]: ...

    def overrides(self, trial: optuna.Trial) -> list[str]: ...

    def finish(self, trial: optuna.Trial, outcome: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Workers:
    """How many asynchronous workers, where, and what they share."""

    n_jobs: int
    per_gpu: int | None
    device: str  # the trials' device key: `cpu` keeps them off the GPUs
    sweep_dir: Path
    pruner: optuna.pruners.BasePruner


def in_batches(
    trials: Trials, launcher: Any, n_jobs: int, idle_seconds: float, after_batch: Callable[[], None]
) -> None:
    """Batches of `n_jobs` through Hydra's launcher (in-process, or submitit's jobs)."""
    job = 0
    while trials.done() < trials.n_trials:
        asked = storage_retries(lambda: trials.ask(n_jobs), "asking for trials")
        if not asked:  # the rest of the budget runs on other machines
            time.sleep(idle_seconds)
            continue
        returns = launcher.launch([trials.overrides(trial) for trial in asked], initial_job_idx=job)
        after_batch()
        job += len(returns)
        for trial, ret in zip(asked, returns, strict=True):
            try:
                outcome = ret.return_value  # raises the trial's exception
            except Exception as error:  # a failed trial: recorded, the study goes on
                outcome = {"state": "fail", "error": f"{type(error).__name__}: {error}"}
            trials.finish(trial, outcome)


def in_pool(trials: Trials, settings: Workers, idle_seconds: float) -> None:
    """Asynchronous workers: a free worker takes the next trial at once, no batch barrier."""
    gpus = workers.visible_gpus(str(trials.fixed.get("device", settings.device)))
    slots = workers.plan(settings.n_jobs, settings.per_gpu, gpus, devices.usable_cores())
    folder = settings.sweep_dir / "workers"
    shown = ", ".join(f"gpu {s.gpu}" if s.gpu else f"{s.threads} threads" for s in slots)
    print(f"{len(slots)} workers: {shown} (logs in {folder})")
    pool = workers.Pool(slots, folder, settings.pruner, CONF_DIR)
    interrupted = True
    try:
        while trials.done() < trials.n_trials:
            for slot in pool.idle():
                asked = storage_retries(lambda: trials.ask(1), "asking for a trial")
                if not asked:
                    break
                trial = asked[0]
                overrides = trials.overrides(trial)
                if "threads" not in trials.fixed:  # the cores are shared between the workers
                    overrides.append(f"threads={slot.threads}")
                pool.submit(slot, workers.Task(trial, overrides, settings.sweep_dir / str(trial.number)))
            if not pool.running():  # the budget is taken by trials running elsewhere
                time.sleep(idle_seconds)
                continue
            for task, outcome in pool.wait(timeout=1.0):
                if outcome is None:
                    outcome = {"state": "crash", "error": "its worker process died mid-trial"}
                trials.finish(task.key, outcome)
        interrupted = False
    finally:
        pool.close(stop_running=interrupted)  # a signal or an error: running trials are stopped now
