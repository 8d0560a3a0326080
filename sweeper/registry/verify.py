"""Check a registered adapter before it is trusted: files, base model and numbers.

Download the version's files, check the adapter's sha256 against its tag and the base
checkpoint's against the adapter's record, re-apply the adapter and re-evaluate it on
the trial's fine-tuning validation set: the errors must match the logged ones within
`RTOL` (re-evaluating with the trial's thread count is usually bit-exact; another
device or thread count moves float32 results by ~1e-7).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from sweeper import adapter, data, evaluate
from sweeper.registry import models

RTOL = 1e-4


class VerificationError(ValueError):
    """The candidate failed a check; the message says which."""


@dataclass
class Verified:
    metrics: dict[str, tuple[float, float]]  # name -> (logged, re-evaluated)
    max_relative_difference: float
    base_checkpoint: Path


def verify(
    client: MlflowClient,
    version: ModelVersion,
    base: str | Path | None = None,
    device: str = "cpu",
) -> Verified:
    label = f"models:/{version.name}/{version.version}"
    with tempfile.TemporaryDirectory(prefix="pet-lora-verify-") as folder:
        try:
            fetched = models.fetch(label, Path(folder), client)  # checks the adapter's sha256
            checkpoint = models.base_checkpoint(fetched, base)
            trained_on = adapter.read_config(fetched.folder)["base_checkpoint_sha256"]
            tagged = str(version.tags.get("base_checkpoint_sha256"))
            if trained_on != tagged:
                raise VerificationError(
                    f"{label}: base_checkpoint_sha256 tag {tagged[:12]}… differs from the adapter's "
                    f"base {trained_on[:12]}…"
                )
            model = adapter.apply(fetched.folder, checkpoint)
        except (models.ModelError, adapter.AdapterError) as error:
            raise VerificationError(str(error)) from None
    dataset, labels, threads = _validation_set(client, version, label)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        found = evaluate.errors(model, dataset, labels, torch.device(device))
    finally:
        torch.set_num_threads(previous)
    compared, worst = {}, 0.0
    for name, value in found.items():
        tag = version.tags.get(f"val_{name}")
        if tag is None:
            raise VerificationError(f"{label}: no val_{name} tag to compare with")
        logged = float(tag)
        difference = abs(value - logged) / max(abs(logged), 1e-12)
        compared[f"val_{name}"] = (logged, value)
        worst = max(worst, difference)
        if difference > RTOL:
            raise VerificationError(
                f"{label}: re-evaluated val_{name} {value:.6g} differs from the logged {logged:.6g} "
                f"(relative {difference:.1e} > {RTOL:g})"
            )
    return Verified(compared, worst, checkpoint)


def _validation_set(client: MlflowClient, version: ModelVersion, label: str) -> tuple[object, object, int]:
    """The trial's validation set (from its logged config), its labels and its thread count."""
    try:
        run = client.get_run(version.run_id)
        with tempfile.TemporaryDirectory() as folder:
            cfg = OmegaConf.load(client.download_artifacts(version.run_id, "config.yaml", folder))
    except (MlflowException, OSError) as error:
        raise VerificationError(f"{label}: cannot read its trial's config.yaml ({error})") from None
    try:
        dataset, labels, role, sha = data.validation_set(cfg)
    except ValueError as error:
        raise VerificationError(f"{label}: its validation data is unusable here ({error})") from None
    logged = run.data.tags.get(f"data_{role}_sha256")
    if logged != sha:
        raise VerificationError(
            f"{label}: data.finetune.{role} {cfg.data.finetune[role]} has sha256 {sha[:12]}…, "
            f"the trial's was {str(logged)[:12]}…"
        )
    return dataset, labels, int(run.data.tags.get("threads", torch.get_num_threads()))
