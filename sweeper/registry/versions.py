"""The MLflow model registry: every finished, feasible trial's adapter as a model version.

MLflow 3 registers logged models, not artifact folders (`register_model("runs:/…/adapter")`
fails), so the adapter folder becomes a LoggedModel linked to the trial's run, finalized
READY only once every file is uploaded, and that model becomes a version. The version's
tags carry what promotion checks and ranks by: the objective values, the retained errors,
the sha256 of the base checkpoint and of the adapter, the LoRA config, the study and trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweeper import adapter
from sweeper.objective import Goal, feasible

if TYPE_CHECKING:
    from sweeper.config import Config
    from sweeper.search.membership import Membership
    from sweeper.tracking import TrialRun

CHAMPION, PREVIOUS = "champion", "previous"
# Not "adapter": MLflow resolves `runs:/<id>/<name>` to a run's logged model of that name,
# which would shadow the run's own `adapter/` artifact folder.
LOGGED_MODEL_NAME = "registered-adapter"
# Metric prefixes copied onto a version: fine-tuning errors, retained and base errors.
TAGGED_METRICS = ("val_", "test_", "retained_", "base_")


def model_name(cfg: Config) -> str:
    """`registry.model_name`, or one derived from the base model: `base_pet_cu-lora`."""
    return cfg.registry.model_name or f"{Path(cfg.model.checkpoint).stem}-lora"


NO_RETAINED_METRIC = "none"  # the retained_metric tag of a study without an original set


def version_tags(
    cfg: Config,
    goal: Goal,
    metrics: dict[str, float],
    run_id: str,
    adapter_dir: Path,
    base_sha: str,
    membership: Membership | None = None,
) -> dict:
    """Everything a version must say about itself; floats in full precision (repr)."""
    tags: dict[str, str] = {}
    if membership is not None:
        tags |= membership.tags()
    tags |= {
        "run_id": run_id,
        "objective_metric": goal.metric,
        "retained_metric": goal.retained_metric or NO_RETAINED_METRIC,
        "retained_tolerance": repr(float(goal.tolerance)),
        "adapter_sha256": adapter.digest(adapter_dir),
        "base_checkpoint_sha256": base_sha,
        "base_checkpoint": str(Path(cfg.model.checkpoint).resolve()),
        "finetune.method": str(getattr(cfg.finetune.method, "value", cfg.finetune.method)),
        "lora.rank": str(cfg.lora.rank),
        "lora.alpha": repr(float(cfg.lora.alpha)),
        "lora.target_modules": ",".join(cfg.lora.target_modules),
        "lora.init": str(getattr(cfg.lora.init, "value", cfg.lora.init)),
        "train.lr": repr(float(cfg.train.lr)),
        "energy_reference": str(getattr(cfg.data.finetune.energy_reference, "value", "base")),
        "targets": ",".join(adapter.read_config(adapter_dir)["targets"]),
    }
    tags |= {name: repr(float(value)) for name, value in metrics.items() if name.startswith(TAGGED_METRICS)}
    return tags


def register_trial(
    cfg: Config,
    goal: Goal,
    trial: TrialRun,
    metrics: dict,
    adapter_dir: Path,
    base_sha: str,
    experiment_id: str,
    membership: Membership | None,
) -> str | None:
    """A version in the model registry for a feasible trial; returns `name/version`.

    Runs last, inside the trial's run: a failure here fails the run, and a version only
    exists once its files are uploaded and its tags written. Without an original set
    every finished trial is feasible.
    """
    if not cfg.registry.enabled:
        return None
    if not feasible(goal, metrics):
        trial.set_tags({"registered": "false", "registered_reason": f"not feasible ({goal.describe()})"})
        return None
    name = model_name(cfg)
    version = register(
        trial.client,
        name,
        experiment_id,
        trial.run_id,
        adapter_dir,
        version_tags(cfg, goal, metrics, trial.run_id, adapter_dir, base_sha, membership),
        description(cfg, base_sha),
    )
    trial.set_tags({"registered": "true", "registered_model": name, "registered_version": version.version})
    return f"{name}/{version.version}"


def register(
    client: MlflowClient,
    name: str,
    experiment_id: str,
    run_id: str,
    adapter_dir: Path,
    tags: dict[str, str],
    description: str,
) -> ModelVersion:
    """Log the adapter as a model of the run and register it as a new version of `name`."""
    model = mlflow.initialize_logged_model(
        name=LOGGED_MODEL_NAME,
        source_run_id=run_id,
        experiment_id=experiment_id,
        tags={"adapter_sha256": tags["adapter_sha256"]},
    )
    try:
        client.log_model_artifacts(model.model_id, str(adapter_dir))
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    _ensure_model(client, name, description)
    # Tags go in with the version in one call: no version ever exists without them.
    return client.create_model_version(
        name, source=f"models:/{model.model_id}", run_id=run_id, tags=tags, model_id=model.model_id
    )


def _ensure_model(client: MlflowClient, name: str, description: str) -> None:
    try:
        client.create_registered_model(name, tags={"created_by": "pet-lora-sweeper"}, description=description)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def description(cfg: Config, base_sha: str) -> str:
    return (
        f"LoRA adapters for the PET base model `{Path(cfg.model.checkpoint).name}` "
        f"(sha256 {base_sha[:12]}…), one version per finished, feasible trial. "
        f"`python -m sweeper.promote` verifies the best one and gives it the `{CHAMPION}` alias."
    )
