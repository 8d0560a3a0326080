"""What a study leaves behind: optimization_results.yaml, the trials table, the summary."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from sweeper.config import redact
from sweeper.search import plots


def constraints(trial: FrozenTrial) -> list[float]:
    """Optuna's `constraints_func`: feasible when <= 0; a trial without one is not."""
    return list(trial.user_attrs.get("constraints", [1.0]))


def feasible(trial: FrozenTrial) -> bool:
    return all(c <= 0 for c in constraints(trial))


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Single objective: the best feasible trial; several: the Pareto front."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(study.directions) > 1:
        return list(study.best_trials)
    candidates = [t for t in complete if feasible(t)]
    if not candidates:
        return []
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    return [min(candidates, key=lambda t: sign * t.value)]


def write(study: optuna.Study, sweep_dir: Path, cfg: Any) -> dict[str, Any]:
    """The official plugin's optimization_results.yaml, in the sweep directory."""
    best = best_trials(study)
    summary: dict[str, Any] = {"name": "optuna", "study_name": study.study_name}
    if len(study.directions) > 1:
        summary["solutions"] = [{"params": t.params, "values": t.values, "number": t.number} for t in best]
    elif best:
        summary |= {"best_params": best[0].params, "best_value": best[0].value, "best_trial": best[0].number}
    else:
        summary |= {"best_params": None, "best_value": None, "note": "no feasible completed trial"}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
    return summary


def log_to_parent(
    client: MlflowClient, parent: str, study: optuna.Study, summary: dict, sweep_dir: Path, cfg: Any
) -> None:
    """The study's run: results, the trials table, the plots and a description."""
    client.log_artifact(parent, str(sweep_dir / "optimization_results.yaml"))
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "trials.csv"
        study.trials_dataframe().to_csv(table, index=False)
        client.log_artifact(parent, str(table))
        for path in plots.save(study, Path(folder) / "plots", cfg.objective.metric):
            client.log_artifact(parent, str(path), "plots")
    if summary.get("best_value") is not None:
        client.log_metric(parent, "best_value", float(summary["best_value"]))
        client.set_tag(parent, "best_trial", str(summary["best_trial"]))
    client.set_tag(parent, "mlflow.note.content", description(study, summary, cfg))


def description(study: optuna.Study, summary: dict, cfg: Any) -> str:
    """The parent run's description in the MLflow UI: the study in a few lines."""
    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    objective = cfg.objective
    goal = f"minimise `{objective.metric}`"
    if len(study.directions) == 1:
        goal += f" with `{objective.retained_metric}` <= {1 + objective.retained_tolerance:g}"
    else:
        goal += f" and `{objective.retained_metric}` (Pareto front)"
    lines = [
        f"Optuna study `{study.study_name}`: {len(study.trials)} trials ("
        + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        + ")",
        f"sampler {type(study.sampler).__name__}, pruner {type(study.pruner).__name__}; {goal}",
    ]
    if summary.get("best_value") is not None:
        lines.append(
            f"best: trial {summary['best_trial']}, {summary['best_value']:.4g}, {summary['best_params']}"
        )
    elif "solutions" in summary:
        lines.append(f"Pareto front: {len(summary['solutions'])} trials")
    return "\n\n".join(lines)


def table(study: optuna.Study, cfg: Any, fixed: dict[str, str], storage: str) -> str:
    """The console summary: best trials first, then where to look."""
    metric, retained = cfg.objective.metric, cfg.objective.retained_metric
    rows = [f"{'trial':>5} {'rank':>5} {'alpha':>8} {'lr':>9} {metric:>26} {retained:>26} state"]
    order = sorted(study.trials, key=lambda t: (t.state != TrialState.COMPLETE, not feasible(t), _value(t)))
    for trial in order[:10]:
        metrics = trial.user_attrs.get("metrics", {})
        params = {**{key: _number(value) for key, value in fixed.items()}, **trial.params}
        state = trial.state.name.lower() + (
            "" if feasible(trial) or trial.state != TrialState.COMPLETE else " infeasible"
        )
        rows.append(
            f"{trial.number:>5} {_fmt(params.get('lora.rank'))}"
            f" {_fmt(params.get('lora.alpha'), 8)}"
            f" {_fmt(params.get('train.lr'), 9)} {_fmt(metrics.get(metric), 26)}"
            f" {_fmt(metrics.get(retained), 26)} {state}"
        )
    rows.append(f"browse: mlflow ui ({redact(cfg.tracking.uri)}); study {study.study_name!r} in {storage}")
    return "\n".join(rows)


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _value(trial: FrozenTrial) -> float:
    return trial.values[0] if trial.values else math.inf


def _fmt(value: Any, width: int = 5) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:.3g}".rjust(width)
    return str(value).rjust(width)
