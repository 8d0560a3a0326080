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
    name, bound = cfg.objective.retained_metric, 1 + cfg.objective.retained_tolerance
    retained = _metric(metrics, name, "objective.retained_metric")
    if name.endswith("_ratio"):
        return retained - bound
    base = _metric(metrics, name.replace("retained_", "base_", 1), "objective.retained_metric")
    return retained - bound * base


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
