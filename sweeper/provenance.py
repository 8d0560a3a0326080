"""What a trial's MLflow run says about itself: its name, tags and the data it saw."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sweeper import config, data, devices, replay, tracking
from sweeper import metatrain as mtt
from sweeper.config import Config, EnergyReference, Method

if TYPE_CHECKING:
    from sweeper.search.membership import Membership


def run_name(cfg: Config, membership: Membership | None = None) -> str:
    """Says what the trial is: `r8 a16 lr1e-3`, `t3 r8 a16 lr3e-4` in a sweep, `full lr1e-3`,
    `r8 a16 lr1e-3 replay64` with 64 replayed structures (`replay64b`: base labels, `x2`: repeat,
    `replay16of256`: 16 drawn each epoch from a pool of 256), `anchor0.01` with an L2-SP weight."""
    lr = f"lr{cfg.train.lr:.0e}".replace("e-0", "e-").replace("e+0", "e")
    method = Method(cfg.finetune.method).value
    name = f"{method} {lr}" if method != "lora" else f"r{cfg.lora.rank} a{cfg.lora.alpha:.3g} {lr}"
    mixed = cfg.finetune.replay
    if mixed.structures:
        labels = "b" if config.ReplayLabels(mixed.labels) == config.ReplayLabels.base else ""
        pool = f"of{mixed.pool}" if mixed.pool is not None else ""
        name += f" replay{mixed.structures}{pool}{labels}" + (f"x{mixed.repeat}" if mixed.repeat > 1 else "")
    if cfg.finetune.anchor.weight:
        name += f" anchor{cfg.finetune.anchor.weight:.3g}"
    return name if membership is None else f"t{membership.trial_number} {name}"


def tags(
    cfg: Config,
    base_sha: str,
    datasets: data.Datasets,
    device: torch.device,
    threads: int,
    base_targets: list[str],
    membership: Membership | None = None,
) -> dict[str, str]:
    """Checkpoint, data digests, versions and hardware: what decides whether two runs compare."""
    found = {
        "base_checkpoint_sha256": base_sha,
        "base_targets": ",".join(base_targets),
        "finetune_method": Method(cfg.finetune.method).value,
        "energy_reference": EnergyReference(cfg.data.finetune.energy_reference).value,
        "metatrain_version": mtt.METATRAIN_VERSION,
        "torch_version": torch.__version__,
        "sweeper_version": package_version(),
        "device": str(device),
        "device_name": devices.describe(device),
        "threads": str(threads),
    }
    found |= {f"data_{role}_sha256": sha for role, sha in datasets.sha256.items()}
    if membership is not None:
        found |= membership.tags()
    commit = tracking.git_commit(Path(__file__).parent)
    if commit:
        found["mlflow.source.git.commit"] = commit
    return found


def package_version() -> str:
    try:
        return version("pet-lora-sweeper")
    except PackageNotFoundError:
        return "unknown"


def original_sizes(datasets: data.Datasets, replay_indices: list[int]) -> dict[str, str]:
    """How many structures of the original file measure retention and how many are replayed."""
    retained = len(datasets.original) if datasets.original is not None else 0
    return {
        "original.retained_structures": str(retained),
        "original.replay_structures": str(len(replay_indices)),
    }


def original_indices(datasets: data.Datasets, replayed: replay.Replay | None) -> str:
    """Which structures of the original file did what: disjoint by construction, logged to show it."""
    retained = datasets.original_indices
    if retained is None and datasets.original is not None:
        retained = list(range(len(datasets.original)))
    return json.dumps({"retained": retained or [], "replay": replayed.indices if replayed else []})


def dataset_files(
    cfg: Config, datasets: data.Datasets, replayed: replay.Replay | None
) -> list[tracking.DatasetFile]:
    """What the trial saw, for MLflow's Dataset column: file, sha256, structures, role."""
    finetune, sha = cfg.data.finetune, datasets.sha256
    validation_file = "validation" if finetune.validation is not None else "train"  # split off train
    files = [
        tracking.DatasetFile("finetune-train", "training", finetune.train, sha["train"], len(datasets.train)),
        tracking.DatasetFile(
            "finetune-validation",
            "validation",
            finetune[validation_file],
            sha[validation_file],
            len(datasets.validation),
        ),
    ]
    if datasets.test is not None:
        files.append(
            tracking.DatasetFile("finetune-test", "test", finetune.test, sha["test"], len(datasets.test))
        )
    if datasets.original is not None:
        path = cfg.data.original.path
        files.append(
            tracking.DatasetFile("original", "original", path, sha["original"], len(datasets.original))
        )
        if replayed is not None:
            files.append(
                tracking.DatasetFile(
                    "original-replay", "training", path, sha["original"], len(replayed.indices)
                )
            )
    return files
