"""What a trial returns to the sweeper: objective values and the retained-accuracy constraint."""

from __future__ import annotations

from typing import Any

from sweeper.config import ConfigError, ObjectiveMode


def _metric(metrics: dict[str, float], name: str, key: str) -> float:
    if name not in metrics:
        raise ConfigError(f"{key}: no metric {name!r}; a trial reports {sorted(metrics)}")
    return metrics[name]


def constraint(cfg: Any, metrics: dict[str, float]) -> float:
    """<= 0 when the retained error is within (1 + tolerance) x the base model's."""
    return retained_excess(metrics, cfg.objective.retained_metric, cfg.objective.retained_tolerance)


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


def outcome(cfg: Any, metrics: dict[str, float], run_id: str) -> dict[str, Any]:
    """Picklable, so any Hydra launcher can carry it back to the sweeper."""
    values = [_metric(metrics, cfg.objective.metric, "objective.metric")]
    if ObjectiveMode(cfg.objective.mode) == ObjectiveMode.pareto:
        values.append(_metric(metrics, cfg.objective.retained_metric, "objective.retained_metric"))
    return {
        "state": "complete",
        "values": values,
        "constraints": [constraint(cfg, metrics)],
        "run_id": run_id,
        "metrics": metrics,
    }
