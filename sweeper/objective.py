"""What a trial is judged by, decided from the config before any trial runs.

The metrics a trial reports follow its data: forces only when the data has forces,
stress only with stress or virial labels, test and retained errors only with a test
file and an original set. `goal` resolves the objective's defaults from the same facts
(the validation force MAE, or the energy MAE for energy-only data; the retained ratio of
the same quantity, or none without an original set) and rejects a metric the data cannot
produce with one line, so a study never runs a trial it cannot score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sweeper.config import Config, ConfigError, EpochSelection, ObjectiveMode

# Reported by every trial, whatever its data.
BOOKKEEPING = (
    "best_epoch",
    "epochs_run",
    "parameters",
    "trainable_parameters",
    "train_seconds",
    "evaluation_seconds",
)


@dataclass(frozen=True)
class Goal:
    metric: str  # minimised, reported per epoch when it is a validation metric
    retained_metric: str | None  # None: no original set, the study optimises `metric` alone
    tolerance: float  # feasible: retained_metric <= 1 + tolerance (x base for absolute metrics)
    pareto: bool  # minimise (metric, retained_metric) together

    def describe(self) -> str:
        text = f"minimise {self.metric}"
        if self.retained_metric is None:
            return text + " alone (no original set: retained accuracy is not measured)"
        if self.pareto:
            return text + f" and {self.retained_metric} (Pareto front)"
        bound = f"{1 + self.tolerance:g}" + ("" if self.retained_metric.endswith("_ratio") else " x base")
        return text + f" with {self.retained_metric} <= {bound}"


def quantities(labels: Any) -> list[str]:
    """The error metrics (without prefix) data with these labels gives: `energy_mae_meV_per_atom`, ..."""
    names = ["energy_mae_meV_per_atom", "energy_rmse_meV_per_atom"]
    if labels.forces:
        names += ["force_mae_meV_per_A", "force_rmse_meV_per_A"]
    if labels.stress or labels.virial:
        names += ["stress_mae_meV_per_A3", "stress_rmse_meV_per_A3"]
    return names


def final_metrics(cfg: Config) -> set[str]:
    """Every final metric a trial of `cfg` reports."""
    finetune, original = cfg.data.finetune, cfg.data.original
    names = {f"val_{q}" for q in quantities(finetune)} | set(BOOKKEEPING)
    if finetune.test is not None:
        names |= {f"test_{q}" for q in quantities(finetune)}
    if original.path is not None:
        for q in quantities(original):
            names |= {f"retained_{q}", f"base_{q}", f"retained_{increase(q)}", f"retained_{ratio(q)}"}
    return names


def increase(quantity: str) -> str:
    """`force_mae_meV_per_A` -> `force_mae_increase_meV_per_A`: fine-tuned minus base."""
    return quantity.replace("_mae_", "_mae_increase_").replace("_rmse_", "_rmse_increase_")


def ratio(quantity: str) -> str:
    """`force_mae_meV_per_A` -> `force_mae_ratio`: fine-tuned over base, unitless."""
    return quantity.split("_meV")[0] + "_ratio"


def epoch_metrics(cfg: Config) -> set[str]:
    """The metrics of every epoch's row (MLflow's `epoch/<name>`), what a pruner can listen to."""
    finetune = cfg.data.finetune
    per_epoch = ["energy_mae_meV_per_atom", "energy_rmse_meV_per_atom"]
    if finetune.forces:
        per_epoch += ["force_mae_meV_per_A", "force_rmse_meV_per_A"]
    if finetune.stress or finetune.virial:  # metatrain logs the virial per atom, in energy units
        per_epoch += ["virial_mae_meV_per_atom", "virial_rmse_meV_per_atom"]
    return {f"{split}_{q}" for split in ("train", "val") for q in [*per_epoch, "loss"]} | {"learning_rate"}


def goal(cfg: Config) -> Goal:
    """The objective of `cfg`, defaults resolved; ConfigError for a metric the data lacks."""
    objective, finetune = cfg.objective, cfg.data.finetune
    has_original = cfg.data.original.path is not None
    quantity = "force" if finetune.forces else "energy"
    metric = objective.metric or f"val_{quantity}_mae_{'meV_per_A' if finetune.forces else 'meV_per_atom'}"
    retained = objective.retained_metric
    if retained is None and has_original:  # the same quantity as the metric, where both have it
        both_forces = finetune.forces and cfg.data.original.forces
        retained = f"retained_{'force' if both_forces else 'energy'}_mae_ratio"
    available = final_metrics(cfg)
    _require(metric, available, "objective.metric", cfg)
    pareto = ObjectiveMode(objective.mode) == ObjectiveMode.pareto
    if retained is not None:
        _require(retained, available, "objective.retained_metric", cfg)
        if not retained.endswith("_ratio") and retained.replace("retained_", "base_", 1) not in available:
            raise ConfigError(
                f"objective.retained_metric: {retained!r} has no base_ counterpart to compare with"
            )
    elif pareto:
        raise ConfigError(
            "objective=pareto needs a retained metric, and data.original.path is null "
            "(set an original set, or use objective=constrained)"
        )
    by_objective = EpochSelection(cfg.train.select_epoch_by) == EpochSelection.objective
    if by_objective and not metric.startswith("val_"):
        raise ConfigError(
            f"train.select_epoch_by=objective needs a validation metric to score epochs, "
            f"and objective.metric is {metric!r} (use mae_prod)"
        )
    return Goal(metric, retained, objective.retained_tolerance, pareto)


def _require(name: str, available: set[str], key: str, cfg: Config) -> None:
    if name in available:
        return
    hint = ""
    if "force" in name and not cfg.data.finetune.forces:
        hint = " (data.finetune.forces is false)"
    elif name.startswith(("retained_", "base_")) and cfg.data.original.path is None:
        hint = " (data.original.path is null)"
    elif name.startswith("test_") and cfg.data.finetune.test is None:
        hint = " (data.finetune.test is null)"
    elif "stress" in name:
        hint = " (no stress or virial labels configured)"
    choices = sorted(n for n in available if not n.startswith(BOOKKEEPING))
    raise ConfigError(f"{key}: this data gives no metric {name!r}{hint}; it gives {', '.join(choices)}")


def check_pruning(goal: Goal, cfg: Config, pruning: bool) -> None:
    """A pruner listens to `goal.metric` every epoch: it must be in every epoch's row."""
    if pruning and goal.metric not in epoch_metrics(cfg):
        raise ConfigError(
            f"objective.metric: {goal.metric!r} is not reported per epoch, so the pruner would never "
            f"fire (per-epoch: {', '.join(sorted(epoch_metrics(cfg)))}; or hydra/sweeper/pruner=none)"
        )


def _metric(metrics: dict[str, float], name: str, key: str) -> float:
    if name not in metrics:
        raise ConfigError(f"{key}: no metric {name!r}; a trial reports {sorted(metrics)}")
    return metrics[name]


def constraint(goal: Goal, metrics: dict[str, float]) -> list[float]:
    """Optuna's constraints: [<= 0 when the retained error is within tolerance], none without one."""
    if goal.retained_metric is None:
        return []
    return [retained_excess(metrics, goal.retained_metric, goal.tolerance)]


def feasible(goal: Goal, metrics: dict[str, float]) -> bool:
    return all(value <= 0 for value in constraint(goal, metrics))


def retained_excess(
    metrics: dict[str, float], name: str, tolerance: float, key: str = "objective.retained_metric"
) -> float:
    """How far `name` lies above (1 + tolerance) x the base's error; <= 0 is within tolerance.

    A `*_ratio` metric is already relative to the base; `retained_X` is compared with `base_X`.
    """
    retained, bound = _metric(metrics, name, key), 1 + tolerance
    if name.endswith("_ratio"):
        return retained - bound
    return retained - bound * _metric(metrics, name.replace("retained_", "base_", 1), key)


def outcome(goal: Goal, metrics: dict[str, float], run_id: str) -> dict[str, Any]:
    """Picklable, so any Hydra launcher can carry it back to the sweeper."""
    values = [_metric(metrics, goal.metric, "objective.metric")]
    if goal.pareto:
        values.append(_metric(metrics, goal.retained_metric, "objective.retained_metric"))
    return {
        "state": "complete",
        "values": values,
        "constraints": constraint(goal, metrics),
        "run_id": run_id,
        "metrics": metrics,
    }
