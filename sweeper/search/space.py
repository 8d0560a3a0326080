"""The search space: what a sweep searches and fixes, checked before any study exists.

`grammar.py` reads Hydra's sweep syntax into Optuna distributions. Here the values a
sampler may draw are checked against the config's own rules (`rules.check`): every
choice, both ends of a range and, past a 0 that means "off", the smallest value that does
not, applied to the trial's config, so `lora.rank=range(0,4)` is a one-line error naming
the key instead of a failed trial, and so is `finetune.replay.structures=int(interval(0,96))`
(replay is 0 or at least a batch).
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from sweeper.config import Config, ConfigError
from sweeper.rules import check as check_values
from sweeper.search.grammar import SearchSpaceError


def check_bounds(space: dict[str, BaseDistribution], trial_cfg: Config) -> None:
    """SearchSpaceError naming the key when a value the sampler may draw breaks a rule."""
    for key, distribution in space.items():
        node = OmegaConf.select(trial_cfg, key, default=None)
        if key.startswith(("hydra.", "+", "~")) or OmegaConf.is_config(node):
            continue  # a config group (finetune=lora,full): its options are files Hydra checks
        for value in _extremes(distribution):
            probe = copy.deepcopy(trial_cfg)
            try:
                OmegaConf.update(probe, key, value, merge=False)
                check_values(probe)
            except ConfigError as error:
                raise SearchSpaceError(
                    f"{key}: the search space reaches {value!r}, which a trial rejects ({error})"
                ) from None
            except Exception as error:  # a value of the wrong type for the key
                message = str(error).splitlines()[0]
                raise SearchSpaceError(f"{key}: the search space reaches {value!r}: {message}") from None


def _extremes(distribution: BaseDistribution) -> list[Any]:
    """The values that decide whether every draw is valid: each choice, or both ends and,
    for an integer range from 0 (off), its first value past 0."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    values = [distribution.low, distribution.high]
    if isinstance(distribution, IntDistribution) and distribution.low < 1 <= distribution.high:
        step = distribution.step  # 1 for a log range
        values.insert(1, distribution.low + step * -(-(1 - distribution.low) // step))
    return values


def grid_values(key: str, distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    raise SearchSpaceError(f"{key}: the grid sampler needs choices or integer ranges, got {distribution}")


def grid_size(space: dict[str, BaseDistribution]) -> int:
    size = 1
    for key, distribution in space.items():
        size *= len(grid_values(key, distribution))
    return size
