"""Everything that touches metatrain internals, behind the names below.

metatrain's Python training API is not public (metatrain issue #581), so this package
is the only code of ours that imports it; the project pins a narrow metatrain range and
these files are what change when that range moves. One file per concern: reading data
(`data`), the model and its fine-tuning strategy (`model`), training (`training`),
prediction (`prediction`), export (`export`), and the unit conversions (`units`).

    from sweeper import metatrain as mtt
    dataset, target_info = mtt.read_dataset("surfaces.xyz", mtt.Labels())
"""

from __future__ import annotations

import metatrain as _metatrain
from metatrain.pet import PET

from sweeper.metatrain import heads, units
from sweeper.metatrain.data import (
    ENERGY_TARGET,
    Dataset,
    Labels,
    atomic_types,
    dataset_info,
    energy_target_info,
    read_dataset,
)
from sweeper.metatrain.export import export, merge_lora
from sweeper.metatrain.heads import HEAD
from sweeper.metatrain.model import (
    CheckpointError,
    add_energy_offsets,
    anchor_penalty,
    apply_strategy,
    energy_offsets_removed,
    finetune_strategy,
    keep_only,
    linear_attribute_names,
    load_checkpoint,
    load_state,
    lora_layers,
    new_model,
    parameter_count,
    restart_for,
    trainable_tensors,
)
from sweeper.metatrain.model import atomic_types as model_atomic_types
from sweeper.metatrain.model import targets as model_targets
from sweeper.metatrain.model import units as model_units
from sweeper.metatrain.prediction import Batch, Labelled, label, predict
from sweeper.metatrain.training import (
    LossWeights,
    StopTraining,
    TrainResult,
    metric,
    metric_name,
    save_checkpoint,
    seed_everything,
    train,
    training_hypers,
)

METATRAIN_VERSION: str = _metatrain.__version__

__all__ = [
    "ENERGY_TARGET",
    "HEAD",
    "METATRAIN_VERSION",
    "PET",
    "Batch",
    "CheckpointError",
    "Dataset",
    "Labelled",
    "Labels",
    "LossWeights",
    "StopTraining",
    "TrainResult",
    "add_energy_offsets",
    "anchor_penalty",
    "apply_strategy",
    "atomic_types",
    "dataset_info",
    "energy_offsets_removed",
    "energy_target_info",
    "export",
    "finetune_strategy",
    "heads",
    "keep_only",
    "label",
    "linear_attribute_names",
    "load_checkpoint",
    "load_state",
    "lora_layers",
    "merge_lora",
    "metric",
    "metric_name",
    "model_atomic_types",
    "model_targets",
    "model_units",
    "new_model",
    "parameter_count",
    "predict",
    "read_dataset",
    "restart_for",
    "save_checkpoint",
    "seed_everything",
    "train",
    "trainable_tensors",
    "training_hypers",
    "units",
]
