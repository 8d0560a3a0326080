"""The trial's side of a study: report every epoch, stop at once when pruned.

A trial runs in a Hydra job, maybe on another machine; it reopens the study from its
storage with the same pruner (Optuna does not store pruners) and reports the
fine-tuning metric each epoch. Optuna cannot report intermediate values for several
objectives, so Pareto mode applies our own rule to the fine-tuning metric alone: the
median rule (prune when the trial's best value so far is worse than the median of the
completed trials' values at the same epoch, once `n_startup_trials` have completed and after
`n_warmup_steps` epochs), with the median pruner's settings when one is configured.
"""

from __future__ import annotations

import logging
import statistics
from typing import TYPE_CHECKING

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from optuna.trial import TrialState

from sweeper import objective
from sweeper.search import membership
from sweeper.search.recovery import UNREACHABLE, storage_retries

if TYPE_CHECKING:
    from sweeper.config import Config

log = logging.getLogger(__name__)

CURVE_ATTR = "curve"  # epoch -> fine-tuning metric, for our Pareto-mode rule


def configured_pruner() -> optuna.pruners.BasePruner:
    """The sweep's pruner, rebuilt from the Hydra config this job was launched with."""
    config = HydraConfig.get().sweeper.get("pruner")
    return instantiate(config) if config is not None else optuna.pruners.NopPruner()


class Reporter:
    """The per-epoch hook of one trial inside a study."""

    def __init__(self, member: membership.Membership, cfg: Config, pruner: optuna.pruners.BasePruner) -> None:
        self.metric = objective.goal(cfg).metric
        self.pruner = pruner
        storage = membership.storage()  # from the environment: it may hold a password
        self.study = optuna.load_study(study_name=member.study_name, storage=storage, pruner=pruner)
        self.trial = optuna.trial.Trial(self.study, member.trial_id)
        self.pareto = len(self.study.directions) > 1
        self.curve: dict[str, float] = {}
        self.number = member.trial_number
        self.silent = False

    def started(self, run_id: str) -> None:
        """Lets the controller find (and tag) this trial's MLflow run whatever happens."""
        storage_retries(lambda: self.trial.set_user_attr("run_id", run_id), "recording the trial's run", 60.0)

    def __call__(self, epoch: int, row: dict[str, float]) -> None:
        if self.metric not in row or self.silent:
            return  # a final-only metric, or a trial the study no longer counts
        try:
            self._report(epoch, row[self.metric])
        except optuna.exceptions.UpdateFinishedTrialError:
            # Failed as stale while this worker still ran (a database outage): training goes
            # on to its end for MLflow, the study keeps the trial as it is.
            log.warning("trial %d: the study already finished it; epochs are no longer reported", self.number)
            self.silent = True
        except UNREACHABLE as error:  # a database restart: this epoch goes unreported
            log.warning("epoch %d not reported to the study: %s", epoch, str(error).splitlines()[0])

    def _report(self, epoch: int, value: float) -> None:
        if self.pareto:
            self.curve[str(epoch)] = value
            self.trial.set_user_attr(CURVE_ATTR, self.curve)
            best = min(self.curve.values())
            if _worse_than_median(self.study, self.pruner, epoch, best):
                raise optuna.TrialPruned(
                    f"epoch {epoch}: {self.metric} at best {best:g}, worse than the median"
                )
            return
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {self.metric} {value:g}")


def _worse_than_median(
    study: optuna.Study, pruner: optuna.pruners.BasePruner, epoch: int, best: float
) -> bool:
    """Optuna's median rule: the trial's best value so far against the median of the completed
    trials' values at this epoch (a swing of one epoch, as replay makes, does not prune)."""
    if isinstance(pruner, optuna.pruners.NopPruner):
        return False
    startup = getattr(pruner, "_n_startup_trials", 3)
    warmup = getattr(pruner, "_n_warmup_steps", 2)
    if epoch < warmup:
        return False
    others = [
        trial.user_attrs[CURVE_ATTR][str(epoch)]
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if str(epoch) in trial.user_attrs.get(CURVE_ATTR, {})
    ]
    return len(others) >= startup and best > statistics.median(others)
