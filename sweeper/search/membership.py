"""A trial's place in its study: which study, which trial, under which MLflow parent run.

The controller tells each trial through `+sweep.*` overrides: appended keys, present only in
a study's trial and absent from the core schema (sweeper/config.py), so a single run has no
`sweep` node at all. The study's storage URL is never among them: it may hold a password,
and overrides end up in Hydra's files and logs. It travels in an environment variable that
the controller sets and its jobs and workers inherit; `storage()` reads it where it is needed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

NODE = "sweep"  # the appended config node: `+sweep.study_name=...`
STORAGE_ENV = "PET_LORA_SWEEPER_STORAGE"  # how trials get the storage URL (it may hold a password)


@dataclass(frozen=True)
class Membership:
    """Set by the sweeper for each trial of a study."""

    study_name: str  # the Optuna study the trial belongs to
    trial_number: int  # the trial's number in the study
    trial_id: int  # Optuna's storage id, to report per-epoch values
    parent_run_id: str | None = None  # the study's MLflow run, the trial run's parent

    def overrides(self) -> list[str]:
        """How the controller tells a trial: appended keys, strings quoted (a run id of digits
        stays a string)."""
        told = [
            f"+{NODE}.study_name={_quoted(self.study_name)}",
            f"+{NODE}.trial_number={self.trial_number}",
            f"+{NODE}.trial_id={self.trial_id}",
        ]
        if self.parent_run_id is not None:
            told.append(f"+{NODE}.parent_run_id={_quoted(self.parent_run_id)}")
        return told

    def tags(self) -> dict[str, str]:
        """What the trial's MLflow run and its registered version say about the study."""
        return {"study_name": self.study_name, "trial_number": str(self.trial_number)}


def of(cfg: Any) -> Membership | None:
    """The trial's membership, or None in a single run (no `sweep` node)."""
    node = OmegaConf.select(cfg, NODE, default=None) if OmegaConf.is_config(cfg) else None
    if node is None or node.get("study_name") is None:
        return None
    parent = node.get("parent_run_id")
    return Membership(
        study_name=str(node.study_name),
        trial_number=int(node.trial_number),
        trial_id=int(node.trial_id),
        parent_run_id=None if parent is None else str(parent),
    )


def storage() -> str:
    """The study's storage URL, as the controller handed it to this process's environment."""
    try:
        return os.environ[STORAGE_ENV]
    except KeyError:
        raise RuntimeError(
            f"{STORAGE_ENV} is not set: a trial of a study is started by the sweeper (python -m sweeper -m)"
        ) from None


def _quoted(value: str) -> str:
    """A string as a quoted value of Hydra's override grammar: backslashes are doubled only
    before a quote or at the end, where the grammar reads them as escapes."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"
