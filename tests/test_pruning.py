"""Pareto mode's own pruning rule (Optuna cannot prune a study of two objectives): the median
rule on the fine-tuning metric, as Optuna's MedianPruner applies it to one objective."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution

from sweeper.search.pruning import CURVE_ATTR, _worse_than_median


def _study(*curves: list[float]) -> optuna.Study:
    """A two-objective study whose completed trials reported these fine-tuning curves."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    for curve in curves:
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.5},
                distributions={"x": FloatDistribution(0, 1)},
                values=[min(curve), 1.0],
                user_attrs={CURVE_ATTR: {str(epoch): value for epoch, value in enumerate(curve)}},
            )
        )
    return study


def test_the_best_value_so_far_is_compared_with_the_median_at_that_epoch() -> None:
    study = _study([50, 40, 30], [60, 45, 35], [70, 50, 40])  # medians by epoch: 60, 45, 35
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    assert _worse_than_median(study, pruner, 2, 36.0)
    # A trial at 50 this epoch whose best so far (34) beats the median (35) is kept: Optuna's rule,
    # so that one epoch's swing (replay makes them) does not prune a good trial.
    assert not _worse_than_median(study, pruner, 2, 34.0)


def test_the_rule_waits_for_its_warm_up_and_its_startup_trials() -> None:
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    assert not _worse_than_median(_study([50, 40], [60, 45]), pruner, 0, 1e9)  # epoch 0: warming up
    assert not _worse_than_median(_study([50, 40]), pruner, 1, 1e9)  # one trial completed of 2
    assert not _worse_than_median(_study([50, 40], [60, 45]), optuna.pruners.NopPruner(), 1, 1e9)
