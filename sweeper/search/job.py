"""One trial of a study, wherever it runs: a Hydra job or a worker process.

Reports every epoch to the study, stops at once when pruned, and returns a picklable
outcome for the controller to tell Optuna.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from sweeper import devices, objective, report, signals, tracking, trial
from sweeper.search import membership
from sweeper.search.pruning import Reporter

if TYPE_CHECKING:
    from sweeper.config import Config

log = logging.getLogger(__name__)


def run(
    cfg: Config, output_dir: Path, log_file: Path | None, pruner: optuna.pruners.BasePruner
) -> dict[str, Any]:
    """`{"state": "complete", "values": ..., ...}`, `{"state": "pruned"}` or, for any error
    (a value its checks reject, CUDA out of memory, ...), `{"state": "fail", "error": ...}`:
    a failed trial is recorded and the study goes on."""
    try:
        member = membership.of(cfg)
        if member is None:
            raise RuntimeError("not a trial of a study: the sweeper appends +sweep.* to its overrides")
        reporter = Reporter(member, cfg, pruner)
        with signals.stop_wins():  # a signal that native code turned into an error stops the sweep
            result = trial.run(
                cfg,
                output_dir,
                on_epoch=reporter,
                log_file=log_file,
                on_start=reporter.started,
                membership=member,
            )
    except optuna.TrialPruned as pruned:
        log.info("trial pruned: %s", pruned)
        return {"state": "pruned"}
    except tracking.Unreachable as outage:  # the server's outage, not the parameters': run them again
        log.exception("trial could not start")
        return {"state": "crash", "error": f"{type(outage).__name__}: {outage}"}
    except Exception as error:
        log.exception("trial failed")
        return {"state": "fail", "error": devices.out_of_memory(error) or f"{type(error).__name__}: {error}"}
    finally:
        _free_gpu_memory()
    log.info("%s", report.summary(cfg, result))  # the trial's log; the sweep prints one line per trial
    return objective.outcome(result.goal, result.metrics, result.run_id)


def _free_gpu_memory() -> None:
    """A worker runs trial after trial: what the allocator cached (after an out-of-memory
    error above all) goes back before the next one."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
