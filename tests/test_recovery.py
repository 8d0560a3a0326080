"""A trial's MLflow run is never left RUNNING once its trial is over, whatever outage kept its
controller from ending it (the soak at seed 1: a SIGKILLed worker's attempt kept its run RUNNING)."""

from __future__ import annotations

import mlflow
import optuna
from helpers.tracking import mlflow_client
from optuna.trial import TrialState

from sweeper.search.recovery import Recovery


def test_runs_of_finished_trials_are_ended_and_running_ones_kept(tmp_path) -> None:
    client = mlflow_client(tmp_path)
    experiment = client.create_experiment("pet-lora")
    parent = client.create_run(experiment, tags={"role": "study"}).info.run_id
    study = optuna.create_study(study_name="pet-lora", storage=f"sqlite:///{tmp_path / 'pet-lora.db'}")
    killed, running, done = study.ask(), study.ask(), study.ask()
    study.tell(killed, state=TrialState.FAIL)  # its worker died; the retry is another trial
    study.tell(done, 1.0)

    def child(trial: optuna.Trial) -> str:
        tags = {"trial_number": str(trial.number), mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID: parent}
        return client.create_run(experiment, tags=tags).info.run_id

    orphan, alive, finished = child(killed), child(running), child(done)
    client.set_terminated(finished, "FINISHED")

    recovery = Recovery(max_retries=2)
    recovery.client = client
    assert recovery.end_orphans(study, experiment, parent) == 1
    assert client.get_run(orphan).info.status == "FAILED"
    assert "ended by the sweep" in client.get_run(orphan).data.tags["error"]
    assert client.get_run(alive).info.status == "RUNNING"  # its trial may still finish
    assert client.get_run(finished).info.status == "FINISHED"
    assert recovery.end_orphans(study, experiment, parent) == 0
