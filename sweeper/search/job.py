"""One trial of a study, wherever it runs: a Hydra job or a worker process.

Reports every epoch to the study, stops at once when pruned, and returns a picklable
outcome for the controller to tell Optuna.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from sweeper import objective, report, trial
from sweeper.search.pruning import Reporter


def run(
    cfg: Any, output_dir: Path, log_file: Path | None, pruner: optuna.pruners.BasePruner
) -> dict[str, Any]:
    """`{"state": "complete", "values": ..., ...}` or `{"state": "pruned"}`; bad input raises ConfigError."""
    reporter = Reporter(cfg, pruner)
    try:
        result = trial.run(cfg, output_dir, on_epoch=reporter, log_file=log_file, on_start=reporter.started)
    except optuna.TrialPruned as pruned:
        print(f"trial pruned: {pruned}")
        return {"state": "pruned"}
    print(report.summary(cfg, result))
    return objective.outcome(cfg, result.metrics, result.run_id)
