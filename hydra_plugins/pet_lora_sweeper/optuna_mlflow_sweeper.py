"""The Hydra Sweeper class: stores its arguments and delegates.

Discovered by Hydra through the `hydra_plugins` namespace under its own module name
(it never collides with the official `hydra_optuna_sweeper`). The implementation,
with Optuna and MLflow, is imported lazily so `--help` and composition stay fast.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module
# without registering it in sys.modules, and dataclasses then cannot resolve string
# annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class OptunaMlflowSweeperConf:
    """The official Optuna sweeper's keys, with the same meaning."""

    _target_: str = "hydra_plugins.pet_lora_sweeper.optuna_mlflow_sweeper.OptunaMlflowSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    # hydra/sweeper/sampler: tpe (default), motpe (objective=pareto), random, grid, gp, cmaes, nsgaii, qmc
    sampler: Any = MISSING
    pruner: Any = MISSING  # hydra/sweeper/pruner: median (default), hyperband, successive_halving, none
    # (sampler, pruner: MISSING, not None: this node is merged after its defaults, None would erase them)
    direction: Any = "minimize"  # one value, or a list for several objectives
    storage: str | None = None  # default: sqlite:///<study_name>.db beside mlflow.db
    study_name: str = "pet-lora"  # the study's name in its storage: the same name resumes it
    n_trials: int = 8  # the study's total budget: a re-run resumes up to it
    n_jobs: int = 1  # > 1: that many asynchronous worker processes (cores split between them)
    workers_per_gpu: int | None = None  # set: this many workers on each visible GPU
    max_retries: int = 2  # re-runs of a trial whose worker died (SIGKILL, lost machine)
    heartbeat_interval: int = 30  # seconds; a running trial silent for 3x this is failed
    # more failed trials than this stops the sweep (checked from 4 finished; 0: the first)
    max_failure_rate: float = 0.25
    # the search space: key -> `choice(...)`, `interval(...)`, `tag(log, ...)`, `a,b,c` or a fixed value
    params: dict[str, str] | None = None
    custom_search_space: str | None = None  # "module.function(cfg, trial)"


ConfigStore.instance().store(group="hydra/sweeper", name="optuna_mlflow", node=OptunaMlflowSweeperConf)


class OptunaMlflowSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from sweeper.search.study import StudySweeper

        self.impl = StudySweeper(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.impl.sweep(arguments)
