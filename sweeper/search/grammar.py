"""Hydra's sweep grammar -> Optuna distributions, as the official Optuna sweeper reads it.

`lora.rank=4,8,16` and `choice(4,8,16)` are categorical; `range(a,b[,step])` is an integer
(or stepped float) uniform with b inclusive, like the official plugin; `interval(a,b)` is
uniform (integer when both ends are); `tag(log, interval(a,b))` is log-uniform;
`shuffle(...)` is categorical; a plain value fixes the key. Mistakes (an empty or
reversed interval, a log interval touching 0, a key the config does not have) raise
SearchSpaceError before any trial starts.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


class SearchSpaceError(ValueError):
    """A search-space entry that cannot be searched; the message names the key."""


def parse(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """Overrides -> (distributions to search, fixed values); later entries win."""
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return distributions, fixed


def distribution(override: Override) -> BaseDistribution:
    key = override.get_key_element()
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise SearchSpaceError(f"{key}: empty choice")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if any(isinstance(x, float) for x in (start, stop, step)):
            return _checked(key, FloatDistribution, float(start), float(stop), step=float(step))
        return _checked(key, IntDistribution, int(start), int(stop), step=int(step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        start, end = value.start, value.end
        if log and (start <= 0 or end <= 0):
            raise SearchSpaceError(f"{key}: a log interval must be > 0, got interval({start}, {end})")
        if isinstance(start, int) and isinstance(end, int):
            return _checked(key, IntDistribution, start, end, log=log)
        return _checked(key, FloatDistribution, float(start), float(end), log=log)
    raise SearchSpaceError(f"{key}: {override.input_line} is not a sweep Optuna can search")


def _checked(key: str, kind: type, low: Any, high: Any, **options: Any) -> BaseDistribution:
    if low > high or (low == high and kind is FloatDistribution):
        raise SearchSpaceError(f"{key}: empty or reversed range ({low}, {high})")
    try:
        return kind(low, high, **options)
    except ValueError as error:
        raise SearchSpaceError(f"{key}: {error}") from None


def check_keys(keys: list[str], config: DictConfig) -> None:
    """Every searched or fixed key must exist in the task config (no silent typos)."""
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    for key in keys:
        if key.startswith(("hydra.", "+", "~")) or "/" in key:
            continue
        if OmegaConf.select(task, key, default=_MISSING) is _MISSING and not _is_group(key, config):
            raise SearchSpaceError(f"{key}: no such config key")


_MISSING = object()


def _is_group(key: str, config: DictConfig) -> bool:
    choices = OmegaConf.select(config, "hydra.runtime.choices", default={}) or {}
    return key in choices


def overrides(params: dict[str, Any], fixed: dict[str, str]) -> list[str]:
    """A trial's Hydra overrides: its sampled values, then the fixed ones."""
    return [f"{key}={value}" for key, value in {**params, **fixed}.items()]
