"""The study reader: the Optuna study a sweep left, and what a finished sweep owes its trials."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient


def sweep_study(where: Path | str, name: str = "pet-lora") -> optuna.Study:
    """The study `name` of a sweep: in `where/<name>.db` when `where` is its folder (the default
    storage), else at the storage URL `where` (e.g. `postgresql://...`)."""
    storage = where if isinstance(where, str) else f"sqlite:///{where / f'{name}.db'}"
    return optuna.load_study(study_name=name, storage=storage)


def check_nothing_lost_or_duplicated(study: optuna.Study, client: MlflowClient, n_trials: int) -> None:
    trials = study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n_trials, states(trials)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    experiment = client.get_experiment_by_name("pet-lora").experiment_id
    found = client.search_runs([experiment], max_results=1000)
    assert not [r for r in found if r.info.status == "RUNNING"]
    children = [r for r in found if "trial_number" in r.data.tags]
    finished = [r for r in children if r.info.status == "FINISHED"]
    # One FINISHED run per complete trial, with that trial's parameters: none lost, none twice.
    assert sorted(int(r.data.tags["trial_number"]) for r in finished) == sorted(t.number for t in complete)
    by_number = {t.number: t for t in complete}
    for run in finished:
        trial = by_number[int(run.data.tags["trial_number"])]
        assert trial.user_attrs["run_id"] == run.info.run_id
        assert int(run.data.params["lora.rank"]) == trial.params["lora.rank"]
        assert run.data.tags["threads"] == run.data.params["threads"]


def states(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[int, str, str | None]]:
    """Each trial's number, state and error: what an assertion on a study's trials shows when it fails."""
    return [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
