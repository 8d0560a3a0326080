"""What a trial prints when it ends: the errors that matter and where everything is."""

from __future__ import annotations

from typing import Any

from sweeper.config import redact
from sweeper.trial import TrialResult


def summary(cfg: Any, result: TrialResult) -> str:
    m = result.metrics
    lines = [
        f"trial finished: {result.epochs_run} epochs, best epoch {result.best_epoch}",
        _row("fine-tuning validation", m, "val"),
    ]
    if "test_energy_mae_meV_per_atom" in m:
        lines.append(_row("fine-tuning test", m, "test"))
    if "retained_energy_mae_meV_per_atom" in m:
        lines.append(_row("original set, fine-tuned", m, "retained"))
        lines.append(_row("original set, base model", m, "base"))
        if "retained_force_mae_ratio" in m:
            lines.append(f"  retained force MAE: {m['retained_force_mae_ratio']:.2f} x the base model's")
    lines += [
        f"MLflow run   {result.run_id}  ({redact(cfg.tracking.uri)}, experiment {cfg.tracking.experiment!r})",
        "             browse: mlflow ui  (in this folder for the default sqlite:///mlflow.db)",
        f"adapter      {result.adapter_dir}  (logged at {result.artifact_uri}/adapter)",
    ]
    if result.registered is not None:
        name, version = result.registered.rsplit("/", 1)
        lines.append(f"registered   models:/{name}/{version}  (promote the best: python -m sweeper.promote)")
    return "\n".join(lines)


def _row(label: str, m: dict[str, float], prefix: str) -> str:
    text = f"  {label:<28} energy MAE {m[f'{prefix}_energy_mae_meV_per_atom']:8.2f} meV/atom"
    if f"{prefix}_force_mae_meV_per_A" in m:
        text += f"   force MAE {m[f'{prefix}_force_mae_meV_per_A']:8.2f} meV/Å"
    return text
