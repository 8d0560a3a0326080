"""What a study leaves behind: optimization_results.yaml, the trials table, the summary."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from sweeper import tracking
from sweeper.objective import Goal
from sweeper.search import plots

if TYPE_CHECKING:
    from sweeper.config import Config


def constraints(trial: FrozenTrial) -> list[float]:
    """A trial's constraints as it reported them: feasible when <= 0; a trial that reported none
    (a study without an original set) is feasible, one that never finished is not."""
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


def write(study: optuna.Study, sweep_dir: Path, goal: Goal) -> dict[str, Any]:
    """The official plugin's optimization_results.yaml, in the sweep directory."""
    best = best_trials(study)
    summary: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "objective": goal.describe()}
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
    client: MlflowClient, parent: str, study: optuna.Study, summary: dict, sweep_dir: Path, goal: Goal
) -> None:
    """The study's run: results, the trials table, the plots and a description."""
    client.log_artifact(parent, str(sweep_dir / "optimization_results.yaml"))
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "trials.csv"
        study.trials_dataframe().to_csv(table, index=False)
        client.log_artifact(parent, str(table))
        for path in plots.save(study, Path(folder) / "plots", goal.metric):
            client.log_artifact(parent, str(path), "plots")
    if summary.get("best_value") is not None:
        client.log_metric(parent, "best_value", float(summary["best_value"]))
        client.set_tag(parent, "best_trial", str(summary["best_trial"]))
    client.set_tag(parent, "mlflow.note.content", description(study, summary, goal))


def description(study: optuna.Study, summary: dict, goal: Goal) -> str:
    """The parent run's description in the MLflow UI: the study in a few lines."""
    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    lines = [
        f"Optuna study `{study.study_name}`: {len(study.trials)} trials ("
        + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        + ")",
        f"sampler {type(study.sampler).__name__}, pruner {type(study.pruner).__name__}; {goal.describe()}",
    ]
    if summary.get("best_value") is not None:
        lines.append(
            f"best: trial {summary['best_trial']}, {summary['best_value']:.4g}, {summary['best_params']}"
        )
    elif "solutions" in summary:
        lines.append(f"Pareto front: {len(summary['solutions'])} trials")
    return "\n\n".join(lines)


def trial_line(trial: FrozenTrial, goal: Goal, seconds: float) -> str:
    """One finished trial on the console: number, parameters, errors, state, wall seconds."""
    metrics = trial.user_attrs.get("metrics", {})
    params = ", ".join(f"{key}={_fmt(value, 0)}" for key, value in sorted(trial.params.items()))
    errors = f"{goal.metric} {_fmt(metrics.get(goal.metric), 0, 4)}"
    if goal.retained_metric is not None:
        errors += f"  {goal.retained_metric} {_fmt(metrics.get(goal.retained_metric), 0)}"
    return f"trial {trial.number:>3}  {params}  {errors}  {_state(trial)}  {seconds:.0f} s"


def table(study: optuna.Study, goal: Goal, fixed: dict[str, str]) -> str:
    """The console summary: the best ten trials, one column per searched key."""
    metric, retained = goal.metric, goal.retained_metric
    keys = sorted({key for trial in study.trials for key in trial.params})
    names = [key.rsplit(".", 1)[-1] for key in keys]
    header = f"{'trial':>5} " + " ".join(f"{name:>10}" for name in names) + f" {metric:>26}"
    rows = [header + (f" {retained:>26}" if retained else "") + " state"]
    order = sorted(study.trials, key=lambda t: (t.state != TrialState.COMPLETE, not feasible(t), _value(t)))
    for trial in order[:10]:
        metrics = trial.user_attrs.get("metrics", {})
        params = {**{key: _number(value) for key, value in fixed.items()}, **trial.params}
        row = f"{trial.number:>5} " + " ".join(_fmt(params.get(key), 10) for key in keys)
        row += f" {_fmt(metrics.get(metric), 26)}" + (
            f" {_fmt(metrics.get(retained), 26)}" if retained else ""
        )
        rows.append(f"{row} {_state(trial)}")
    rows.append(f"objective: {goal.describe()}")
    return "\n".join(rows)


def hints(study: optuna.Study, cfg: Config, experiment_id: str, parent: str, storage: str) -> str:
    """Where to look next: the study's MLflow run, promotion, Optuna's own tools."""
    browse = tracking.ui_link(cfg.tracking.uri, runs_page(experiment_id))
    if cfg.tracking.uri.startswith(("http://", "https://")):
        browse += f" (the study's run: {parent})"
    name = study.study_name
    return "\n".join(
        [
            f"the study in MLflow: {browse}",
            f"promote the best adapter: python -m sweeper.promote --study {name}",
            f"list the trials: optuna trials --study-name {name} --storage {storage}",
            f"dashboard: optuna-dashboard {storage}   (pip install 'pet-lora-sweeper[dashboard]')",
        ]
    )


def runs_page(experiment_id: str) -> str:
    """The experiment's runs table: MLflow 3's UI opens its GenAI overview unless asked."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _state(trial: FrozenTrial) -> str:
    infeasible = trial.state == TrialState.COMPLETE and not feasible(trial)
    return trial.state.name.lower() + (" infeasible" if infeasible else "")


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


def _fmt(value: Any, width: int = 5, digits: int = 3) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:.{digits}g}".rjust(width)
    return str(value).rjust(width)
