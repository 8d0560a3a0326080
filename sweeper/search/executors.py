"""The two ways trials run: Hydra's launcher in batches, or our own asynchronous workers.

Both ask the controller for trials (`StudySweeper.ask`, counted against the budget under
the study lock), run them, and hand each outcome back (`StudySweeper.finish`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sweeper import devices
from sweeper.config import CONF_DIR
from sweeper.search import workers
from sweeper.search.recovery import storage_retries

if TYPE_CHECKING:
    from sweeper.search.study import Run, StudySweeper


def in_batches(sweeper: StudySweeper, run: Run) -> None:
    """Batches of `n_jobs` through Hydra's launcher (in-process, or submitit's jobs)."""
    job = 0
    while run.done() < run.n_trials:
        trials = storage_retries(lambda: sweeper.ask_batch(run, sweeper.n_jobs), "asking for trials")
        if not trials:  # the rest of the budget runs on other machines
            time.sleep(min(5, sweeper.heartbeat_interval))
            continue
        batch = [sweeper.overrides(run, trial) for trial in trials]
        returns = sweeper.launcher.launch(batch, initial_job_idx=job)
        sweeper.scrub_hydra_files()
        job += len(returns)
        for trial, ret in zip(trials, returns, strict=True):
            try:
                outcome = ret.return_value  # raises the trial's exception
            except Exception as error:  # a failed trial: recorded, the study goes on
                outcome = {"state": "fail", "error": f"{type(error).__name__}: {error}"}
            sweeper.finish(run, trial, outcome)


def in_pool(sweeper: StudySweeper, run: Run) -> None:
    """Asynchronous workers: a free worker takes the next trial at once, no batch barrier."""
    gpus = workers.visible_gpus(str(run.fixed.get("device", sweeper.config.device)))
    slots = workers.plan(sweeper.n_jobs, sweeper.workers_per_gpu, gpus, devices.usable_cores())
    folder = sweeper.sweep_dir / "workers"
    shown = ", ".join(f"gpu {s.gpu}" if s.gpu else f"{s.threads} threads" for s in slots)
    print(f"{len(slots)} workers: {shown} (logs in {folder})")
    pool = workers.Pool(slots, folder, sweeper.pruner, CONF_DIR)
    interrupted = True
    try:
        while run.done() < run.n_trials:
            for slot in pool.idle():
                asked = storage_retries(lambda: sweeper.ask_batch(run, 1), "asking for a trial")
                if not asked:
                    break
                trial = asked[0]
                overrides = sweeper.overrides(run, trial)
                if "threads" not in run.fixed:  # the cores are shared between the workers
                    overrides.append(f"threads={slot.threads}")
                pool.submit(slot, workers.Task(trial, overrides, sweeper.sweep_dir / str(trial.number)))
            if not pool.running():  # the budget is taken by trials running elsewhere
                time.sleep(min(5, sweeper.heartbeat_interval))
                continue
            for task, outcome in pool.wait(timeout=1.0):
                if outcome is None:
                    outcome = {"state": "crash", "error": "its worker process died mid-trial"}
                sweeper.finish(run, task.key, outcome)
        interrupted = False
    finally:
        pool.close(stop_running=interrupted)  # a signal or an error: running trials are stopped now
