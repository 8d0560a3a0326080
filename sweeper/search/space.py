"""The search space: what a sweep searches and fixes, checked before any study exists.

`grammar.py` reads Hydra's sweep syntax into Optuna distributions. Here the values a
sampler may draw are checked against the config's own rules (`config.check`): every
choice, and both ends of a range, applied to the trial's config, so `lora.rank=range(0,4)`
is a one-line error naming the key instead of a failed trial. One rule has a gap inside a
range: replay takes 0 structures (off) or at least a batch.
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from sweeper.config import ConfigError
from sweeper.config import check as check_values
from sweeper.search.grammar import SearchSpaceError


def check_bounds(space: dict[str, BaseDistribution], trial_cfg: Any) -> None:
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
        if key == REPLAY_KEY:
            _check_replay_gap(distribution, trial_cfg.train.batch_size)


REPLAY_KEY = "finetune.replay.structures"


def _check_replay_gap(distribution: BaseDistribution, batch_size: int) -> None:
    """Replay is off (0) or fills a batch: metatrain drops a training set's last partial batch."""
    if isinstance(distribution, CategoricalDistribution):
        values = [int(v) for v in distribution.choices]
    elif isinstance(distribution, IntDistribution) and not distribution.log:
        step = distribution.step
        first = (
            distribution.low
            if distribution.low >= 1
            else distribution.low + step * -(-(1 - distribution.low) // step)
        )
        values = [first] if first <= distribution.high else []
    else:
        values = [int(distribution.low)]
    for value in values:
        if 0 < value < batch_size:
            raise SearchSpaceError(
                f"{REPLAY_KEY}: the search space reaches {value}, which a trial rejects (replay is 0, off, "
                f"or at least train.batch_size {batch_size} structures): search "
                f"'choice(0, {batch_size}, 32, 64, 96)' or 'int(interval({batch_size}, 96))'"
            )


def _extremes(distribution: BaseDistribution) -> list[Any]:
    """The values that decide whether every draw is valid: each choice, or both ends."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


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
