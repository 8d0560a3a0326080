"""Optuna's samplers and pruners as typed configs: `hydra/sweeper/sampler=<name>`, `.../pruner=<name>`.

Stored in Hydra's ConfigStore as the official Optuna sweeper stores its own
(hydra_plugins/hydra_optuna_sweeper/config.py): one dataclass per option, each key with its
type and default, so Hydra rejects a typo. Each names its Optuna class in `_target_`; the
sweeper instantiates them. A sampler is a partial (`_partial_`): the sweeper completes it
with the grid's search space and the seed of its controller (sweeper/search/samplers.py).
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module
# without registering it in sys.modules, and dataclasses then cannot resolve string
# annotations.
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, SI

SAMPLERS = "hydra/sweeper/sampler"
PRUNERS = "hydra/sweeper/pruner"


@dataclass
class SamplerConf:
    _target_: str = MISSING  # the Optuna sampler class
    _partial_: bool = True  # completed by the sweeper (constraints, grid search space)
    seed: int | None = SI("${seed}")  # the run's seed (plus the controller's index, samplers.py)


@dataclass
class TPESamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.TPESampler"
    n_startup_trials: int = 5  # random trials before TPE models the space


@dataclass
class MOTPESamplerConf(TPESamplerConf):
    """Multi-objective TPE (Optuna's TPESampler given several directions): the sampler of
    objective=pareto. It models the front from its first trials; NSGA-II (sampler=nsgaii) spends
    its first generation of 50 trials at random, more than a LoRA sweep's budget."""

    multivariate: bool = True  # rank, alpha and lr interact


@dataclass
class RandomSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class GridSamplerConf(SamplerConf):
    """The search space must be discrete (choices, ranges); n_trials is capped at the grid size."""

    _target_: str = "optuna.samplers.GridSampler"  # completed with the grid of the search space


@dataclass
class GPSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.GPSampler"


@dataclass
class CmaEsSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.CmaEsSampler"


@dataclass
class NSGAIISamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.NSGAIISampler"


@dataclass
class QMCSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.QMCSampler"


@dataclass
class MedianPrunerConf:
    """Stop a trial whose validation error is worse than the median of earlier trials at the same epoch."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 3  # completed trials before any is pruned
    # epochs before a trial may be pruned: half the default 40. With replay the early epochs
    # swing, and the best learning rates start slowly: at 2, the README's sweep pruned 5 of its 8
    # trials at epoch 2, and the benchmark saw the best configuration pruned at 10 (docs/forgetting.md)
    n_warmup_steps: int = 20


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 2  # epochs every trial runs
    max_resource: Any = "auto"  # epochs at most: an int, or auto (the first trial's epochs)
    reduction_factor: int = 3  # 1 / reduction_factor of the trials go on at each rung


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: int = 2  # epochs every trial runs
    reduction_factor: int = 3  # 1 / reduction_factor of the trials go on at each rung


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"  # no pruning


OPTIONS: dict[str, dict[str, type]] = {
    SAMPLERS: {
        "tpe": TPESamplerConf,
        "motpe": MOTPESamplerConf,
        "random": RandomSamplerConf,
        "grid": GridSamplerConf,
        "gp": GPSamplerConf,
        "cmaes": CmaEsSamplerConf,
        "nsgaii": NSGAIISamplerConf,
        "qmc": QMCSamplerConf,
    },
    PRUNERS: {
        "median": MedianPrunerConf,
        "hyperband": HyperbandPrunerConf,
        "successive_halving": SuccessiveHalvingPrunerConf,
        "none": NopPrunerConf,
    },
}

for group, options in OPTIONS.items():
    for name, node in options.items():
        ConfigStore.instance().store(group=group, name=name, node=node, provider="pet_lora_sweeper")
