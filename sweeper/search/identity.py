"""What makes a study's trials comparable, recorded with the study and checked on joining.

Re-running in the same folder with other data, another base model, objective, search
space or method used to join the old study silently, and promotion then ranked adapters
evaluated on different validation sets against each other. The study records a
fingerprint when it is created; a controller whose fingerprint differs stops with one
line naming what differs and how to start a new study.
"""

from __future__ import annotations

import json

import optuna
from optuna.distributions import BaseDistribution

from sweeper import embedded
from sweeper.config import Config, ConfigError, Method
from sweeper.files import file_sha256
from sweeper.objective import Goal

FINGERPRINT_ATTR = "fingerprint"
FILES = {
    "model.checkpoint": lambda cfg: cfg.model.checkpoint,
    "data.finetune.train": lambda cfg: cfg.data.finetune.train,
    "data.finetune.validation": lambda cfg: cfg.data.finetune.validation,
    "data.finetune.test": lambda cfg: cfg.data.finetune.test,
    "data.original.path": lambda cfg: cfg.data.original.path,
}


def of(trial_cfg: Config, goal: Goal, space: dict[str, BaseDistribution]) -> dict[str, str]:
    """The fingerprint: files by sha256, the objective, the search space, the method."""
    paths = {key: path(trial_cfg) for key, path in FILES.items()}
    embedded.ensure_used([p for p in paths.values() if p is not None])
    fingerprint = {}
    for key, path in paths.items():
        if path is None:
            fingerprint[key] = "none"
            continue
        try:
            fingerprint[key] = file_sha256(path)
        except OSError:
            raise ConfigError(f"{key}: file not found: {path}") from None
    fingerprint["objective"] = goal.describe()
    fingerprint["search space"] = json.dumps({key: repr(d) for key, d in sorted(space.items())})
    fingerprint["finetune.method"] = Method(trial_cfg.finetune.method).value
    return fingerprint


def check(study: optuna.Study, fingerprint: dict[str, str], storage: str) -> None:
    """Record the fingerprint on a new study; on an existing one, refuse another."""
    recorded = study.user_attrs.get(FINGERPRINT_ATTR)
    if recorded is None:
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        return
    differs = [key for key in fingerprint if recorded.get(key) != fingerprint[key]]
    if differs:
        key = differs[0]
        raise ConfigError(
            f"study {study.study_name!r} in {storage} was made with another {key} "
            f"({_short(recorded.get(key))} there, {_short(fingerprint[key])} now"
            + (f"; {len(differs) - 1} more differ" if len(differs) > 1 else "")
            + "): its trials would not compare; start a new study with hydra.sweeper.study_name=<new name>"
        )


def _short(value: str | None) -> str:
    if value is None:
        return "nothing"
    return value[:12] + "…" if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value
