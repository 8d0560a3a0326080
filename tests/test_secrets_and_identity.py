"""No password anywhere, whatever the launcher; a study joined with other data is refused;
promotion ranks within one study."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.shell import plain_shell
from helpers.studies import sweep_study
from helpers.sweeps import SWEEPER, sweep_args
from helpers.tracking import mlflow_client, runs

from sweeper.secrets import redact

USERINFO_SECRET = "userinfo-secret-7319"
QUERY_SECRET = "query-secret-4471"


def test_redact_masks_userinfo_and_query_string_passwords() -> None:
    text = "postgresql+psycopg2://me:s3cr3t@db:5432/optuna?sslmode=require&password=p4ss;token=t0k"
    masked = redact(text)
    assert "s3cr3t" not in masked and "p4ss" not in masked and "t0k" not in masked
    assert masked == "postgresql+psycopg2://me:***@db:5432/optuna?sslmode=require&password=***;token=***"


@pytest.mark.parametrize(
    "launch",
    [[], ["hydra.sweeper.n_jobs=2"], ["hydra/launcher=submitit_local"]],
    ids=["in-process", "workers", "submitit"],
)
@pytest.mark.slow
def test_no_password_in_any_param_tag_artifact_file_log_or_console(
    launch, postgres, tiny_data, tmp_path
) -> None:
    with postgres.database("secrets") as database:
        user = f"{postgres.user}@"
        url = database.replace(user, f"{postgres.user}:{USERINFO_SECRET}@", 1) + f"?password={QUERY_SECRET}"
        arguments = sweep_args(
            tiny_data,
            tmp_path,
            f"hydra.sweeper.storage='{url}'",  # quoted, as Hydra's grammar needs for the `=` inside
            "hydra.sweeper.n_trials=2",
            "train.epochs=1",
            "threads=1",
            *launch,
        )
        done = subprocess.run(
            [*SWEEPER, *arguments], cwd=tmp_path, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr[-3000:]
        study = sweep_study(database)
        assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2  # the trials reached the storage
    for secret in (USERINFO_SECRET, QUERY_SECRET):
        assert secret not in done.stdout + done.stderr
        for run in runs(tmp_path):
            assert secret not in str(run.data.params) + str(run.data.tags)
        leaked = [
            path for path in tmp_path.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()
        ]
        assert not leaked, leaked  # .hydra/*.yaml, multirun.yaml, logs, artifacts, mlflow.db, submitit files
    hydra_files = list(tmp_path.rglob(".hydra/*.yaml")) + list(tmp_path.rglob("multirun.yaml"))
    if launch != ["hydra.sweeper.n_jobs=2"]:  # Hydra's launchers write them; our worker pool does not
        assert hydra_files and any(":***@" in path.read_text() for path in hydra_files)


def _sweep(tiny_data, workdir: Path, *arguments: str) -> subprocess.CompletedProcess:
    return plain_shell("sweeper", *sweep_args(tiny_data, workdir, "train.epochs=1", *arguments), cwd=workdir,
                       timeout=900)  # fmt: skip


@pytest.mark.slow
def test_joining_a_study_with_other_data_is_refused_with_one_line(tiny_data, tmp_path) -> None:
    first = _sweep(tiny_data, tmp_path, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    other = _sweep(
        tiny_data, tmp_path, "hydra.sweeper.n_trials=2", f"data.finetune.validation={tiny_data['test']}"
    )
    assert other.returncode == 2
    (line,) = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert "data.finetune.validation" in line and "hydra.sweeper.study_name=" in line
    study = sweep_study(tmp_path)
    assert len(study.trials) == 1  # nothing was added to the old study
    again = _sweep(tiny_data, tmp_path, "hydra.sweeper.n_trials=2", "lora.rank=2,4,8")  # another search space
    assert again.returncode == 2 and "search space" in again.stderr
    renamed = _sweep(
        tiny_data,
        tmp_path,
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.study_name=other",
        f"data.finetune.validation={tiny_data['test']}",
    )
    assert renamed.returncode == 0, renamed.stderr[-3000:]


@pytest.mark.slow
def test_promote_ranks_the_most_recent_study_unless_told_otherwise(tiny_data, tmp_path) -> None:
    tolerant = "objective.retained_tolerance=100"  # every trial registered
    for name in ("older", "newer"):
        done = _sweep(
            tiny_data, tmp_path, "hydra.sweeper.n_trials=2", f"hydra.sweeper.study_name={name}", tolerant
        )
        assert done.returncode == 0, done.stderr[-3000:]

    def promote(*arguments: str) -> subprocess.CompletedProcess:
        return plain_shell("sweeper.promote", "--dry-run", *arguments, cwd=tmp_path, timeout=300)

    def ranked(done: subprocess.CompletedProcess) -> set[str]:
        rows = [line.split() for line in done.stdout.splitlines() if line[:3].strip().isdigit()]
        return {row[2] for row in rows}

    default = promote()
    assert default.returncode == 0, default.stderr
    assert "ranking study 'newer', the most recent" in default.stdout and ranked(default) == {"newer"}
    chosen = promote("--study", "older")
    assert ranked(chosen) == {"older"} and "study older" in chosen.stdout
    every = promote("--all-studies")
    assert ranked(every) == {"older", "newer"} and "all studies" in every.stdout
    versions = mlflow_client(tmp_path).search_model_versions()
    assert len(versions) == 4
