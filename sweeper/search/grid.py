"""A grid sweep tries each cell once per run of the command.

A cell is tried when one of its trials completed or was pruned, or failed and was not queued
again. A failure inside a trial (a missing file, a value the data cannot take) is the cell's
own and would recur: the grid goes on to the other cells instead of asking it again, and the
sweep ends once every cell was tried. A trial that crashed or was stopped by a signal is queued
again as in any sweep (`max_retries`), its cell untried until then. The next run of the same
command (a resume, or another machine joining) queues the failed cells once more: their cause
may have been fixed in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.search.recovery import ERROR_ATTR, RETRY_OF_ATTR

DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def tried(trials: Sequence[FrozenTrial]) -> int:
    """How many cells were tried (see the module's docstring)."""
    retried = _retried(trials)
    return len({_cell(t) for t in trials if t.state in DONE or _failed(t, retried)})


def failed(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The last failed trial of each cell that has not completed (nor been pruned)."""
    retried = _retried(trials)
    succeeded = {_cell(t) for t in trials if t.state in DONE}
    last = {_cell(t): t for t in trials if _failed(t, retried) and _cell(t) not in succeeded}
    return sorted(last.values(), key=lambda t: t.number)


def requeue_failed(study: optuna.Study) -> None:
    """Queue each failed cell once more (call it under the study lock, as the sweep starts)."""
    for trial in failed(study.get_trials(deepcopy=False)):
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: trial.number}, skip_if_exists=False)


def report(trials: Sequence[FrozenTrial], size: int) -> str:
    """The failed cells, one line each, for the console ("" when none failed)."""
    cells = failed(trials)
    if not cells:
        return ""
    lines = [f"grid: {len(cells)} of {size} cells failed (not asked again; the same command retries them):"]
    for trial in cells:
        params = " ".join(f"{key}={value}" for key, value in sorted(trial.params.items()))
        reason = str(trial.user_attrs.get(ERROR_ATTR, "failed")).splitlines()[0]
        lines.append(f"  trial {trial.number}  {params}: {reason}")
    return "\n".join(lines)


def _retried(trials: Sequence[FrozenTrial]) -> set[int]:
    return {t.user_attrs[RETRY_OF_ATTR] for t in trials if RETRY_OF_ATTR in t.user_attrs}


def _failed(trial: FrozenTrial, retried: set[int]) -> bool:
    return trial.state == TrialState.FAIL and trial.number not in retried


def _cell(trial: FrozenTrial) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(trial.params.items()))
