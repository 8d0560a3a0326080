"""The configured Optuna sampler, seeded per controller."""

from __future__ import annotations

import functools
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from sweeper.search.space import grid_values

CONTROLLERS_ATTR = "controllers"  # how many controllers have opened the study: seeds their samplers


def is_grid(factory: Any) -> bool:
    return isinstance(factory, functools.partial) and factory.func is optuna.samplers.GridSampler


def build(
    factory: Any, space: dict[str, BaseDistribution], controller: int = 0
) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded `seed + controller`: the n-th controller to open the
    study (a resume, or another machine joining) does not replay the draws of the others,
    and one machine's runs stay deterministic."""
    if not isinstance(factory, functools.partial):
        return factory  # already an instance (a user's own config without _partial_)
    keywords = dict(factory.keywords)
    if controller and keywords.get("seed") is not None:
        keywords["seed"] += controller
    if is_grid(factory):
        grid = {key: grid_values(key, d) for key, d in space.items()}
        return Grid(*factory.args, **{**keywords, "search_space": grid})
    # Constraints reach the samplers through each trial (`Trial.set_constraint`, Optuna 5's way).
    return factory.func(*factory.args, **keywords)


def describe(factory: Any) -> str:
    """The sampler and its settings, for the parent run: `TPESampler(multivariate=True, ...)`."""
    if not isinstance(factory, functools.partial):
        return type(factory).__name__
    settings = ", ".join(f"{key}={value}" for key, value in sorted(factory.keywords.items()) if key != "seed")
    return f"{factory.func.__name__}({settings})"


class Grid(optuna.samplers.GridSampler):
    """GridSampler without its `study.stop()` when the grid is done: that raises outside
    `study.optimize()`, and our loop already stops at the grid's size."""

    def after_trial(self, study: Any, trial: Any, state: TrialState, values: Any) -> None:
        pass


def controller_index(study: optuna.Study) -> int:
    """How many controllers opened the study before this one (call it under the study lock)."""
    index = study.user_attrs.get(CONTROLLERS_ATTR, 0)
    study.set_user_attr(CONTROLLERS_ATTR, index + 1)
    return index
