"""The config schema: every key, its type and default, in one place.

Registered in Hydra's ConfigStore as `base_config`, which `conf/config.yaml` extends, so
Hydra rejects unknown keys and wrong types while composing. `sweeper.rules.check()` adds the
value rules a type cannot say (rank >= 1, lr > 0, ...), before any expensive work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sweeper import embedded
from sweeper.secrets import redact


def _conf_dir() -> Path:
    """The Hydra config tree: `sweeper/conf/` in a wheel (pyproject maps the repository's top-level
    conf/ to the package `sweeper.conf`), the repository's conf/ in a checkout (editable install)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if installed.is_dir() else package.parent / "conf"


CONF_DIR = _conf_dir()


class ConfigError(ValueError):
    """Bad input; the message names the offending key or file."""


class Method(str, Enum):
    lora = "lora"  # LoRA adapters on the target modules, everything else frozen
    full = "full"  # every weight trains: the forgetting-prone baseline
    heads = "heads"  # metatrain's heads-only fine-tuning


class LoraInit(str, Enum):
    zero = "zero"  # B = 0: the adapted model starts exactly as the base
    metatrain = "metatrain"  # metatrain's own random A and B, for parity with `mtt train`


class Scheduler(str, Enum):
    cosine = "cosine"  # metatrain's cosine decay with linear warmup
    constant = "constant"
    step = "step"  # lr * gamma every `step_size` epochs
    exponential = "exponential"  # lr * gamma per epoch


@dataclass
class ModelConfig:
    checkpoint: str = "${embedded:base_model}"  # the base PET checkpoint (a metatrain .ckpt)
    sha256: str | None = None  # the checkpoint's sha256, checked before it is unpickled


class EnergyReference(str, Enum):
    base = "base"  # the labels' energy reference is the base model's (same DFT method)
    refit = "refit"  # another reference method: per-element offsets fitted and folded in


@dataclass
class LabelsConfig:
    energy_key: str = "energy"  # the energy label in each structure's info
    energy_unit: str = "eV"  # any unit metatomic knows: eV, meV, hartree, kcal/mol, kJ/mol, ...
    forces: bool = True  # force labels (false: energies only)
    forces_key: str = "forces"  # the force label in each structure's arrays
    stress: bool = False  # stress labels (energy/length^3, periodic structures only)
    stress_key: str = "stress"  # the stress label in each structure's info
    virial: bool = False  # virial labels (energy) instead of stress: never both
    virial_key: str = "virial"  # the virial label in each structure's info
    length_unit: str = "angstrom"  # angstrom or bohr: the base model's


@dataclass
class FinetuneDataConfig(LabelsConfig):
    train: str = "${embedded:train}"  # structures to fine-tune on: any file ASE reads
    validation: str | None = "${embedded:validation}"  # selects the best epoch; null: split from train
    validation_fraction: float = 0.2  # taken from `train` when `validation` is null
    test: str | None = "${embedded:test}"  # reported, never trained or selected on; null: none
    energy_reference: EnergyReference = EnergyReference.base  # base | refit (another DFT reference)


@dataclass
class OriginalDataConfig(LabelsConfig):
    path: str | None = "${embedded:original}"  # null: no retained accuracy
    max_structures: int | None = 64  # fixed-seed subsample; null: all
    subsample_seed: int = 0  # the permutation that picks retention (then replay) structures


@dataclass
class DataConfig:
    finetune: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    original: OriginalDataConfig = field(default_factory=OriginalDataConfig)


@dataclass
class LoraConfig:
    rank: int = 16  # rank of the LoRA matrices A (rank x in) and B (out x rank)
    alpha: float = 32.0  # the update is scaled by alpha / rank
    # attribute names of the nn.Linear layers to adapt: the attention projections and the
    # feed-forward layers of every PET block (the best fit and the least forgetting, with replay)
    target_modules: list[str] = field(
        default_factory=lambda: ["input_linear", "output_linear", "w_in", "w_out"]
    )
    init: LoraInit = LoraInit.zero  # zero: B = 0, the model starts as the base | metatrain


class EpochSelection(str, Enum):
    mae_prod = "mae_prod"  # metatrain's own: the product of the validation MAEs
    objective = "objective"  # the objective's metric (objective.metric) as the epoch row has it


class ReplayHead(str, Enum):
    shared = "shared"  # the replayed and the fine-tuning data train the same energy head
    separate = "separate"  # the fine-tuning data train a copy of the base's head (MACE multihead)


class ReplayLabels(str, Enum):
    reference = "reference"  # the original file's own labels
    base = "base"  # the base model's predictions: for structures whose labels you do not have


@dataclass
class ReplayConfig:
    """Structures of the original set mixed into every training epoch (metatrain's own
    multi-dataset training), disjoint from those that measure retained accuracy."""

    # replayed in each epoch; 0: no replay; null: 16, drawn each epoch from a pool of up to 32
    # of the original structures that retained accuracy leaves (`pool`, if set), fewer (with a
    # warning) where the file leaves fewer, none without an original set (sweeper/replay.py, `resolved`)
    structures: int | None = None
    # null: the same `structures` every epoch (with `structures` null: the default's pool of up
    # to 32); n: a pool of n original structures from which `structures` are drawn afresh each
    # epoch (seeded): more of the original set is seen at the per-epoch cost of `structures`
    pool: int | None = None
    labels: ReplayLabels = ReplayLabels.reference  # reference: the file's labels | base: its predictions
    # draws of `structures` per epoch: replay's share of the epoch's batches, and so of the loss
    repeat: int = 1
    # structures per replayed batch (null: train.batch_size). Replay pulls toward the old
    # accuracy once per batch, whatever the batch's size: small batches give replay a large
    # share of the training steps for few structures, and an epoch costs what its atoms cost
    batch_size: int | None = 2
    # separate: the fine-tuning data train a new energy head, a copy of the base's, while the
    # replayed data keep training the base's own; the adapter carries the new head, and the
    # deployed model predicts through it (the base head's retained errors: `replay_head_*`)
    head: ReplayHead = ReplayHead.shared


@dataclass
class AnchorConfig:
    """L2-SP: `weight` x sum of (theta - theta_base)^2 over what trains, added to the training
    loss (for LoRA: the update scaling x B x A of each adapted layer). Pulls toward the base."""

    weight: float = 0.0  # 0: off


@dataclass
class FinetuneConfig:
    method: Method = Method.lora  # lora | full | heads
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)


@dataclass
class LossWeightsConfig:
    """metatrain's loss weights: the energy, its forces and its stress (or virial)."""

    energy: float = 1.0  # weight of the per-atom energy term
    forces: float = 1.0  # weight of the force term
    stress: float = 1.0  # weight of the stress (or virial) term


@dataclass
class TrainConfig:
    lr: float = 2e-3  # peak learning rate (Adam, or AdamW with weight_decay)
    epochs: int = 40  # at most; early stopping may end sooner
    batch_size: int = 8  # structures per batch, in every training set
    scheduler: Scheduler = Scheduler.cosine  # cosine | constant | step | exponential
    warmup_fraction: float = 0.01  # cosine only
    step_size: int = 10  # step only, in epochs
    gamma: float = 0.5  # step and exponential
    weight_decay: float | None = None  # set: AdamW instead of Adam
    early_stopping_patience: int | None = 10  # epochs without improvement; null: off
    # What picks the epoch a trial keeps and what early stopping watches: mae_prod | objective.
    # With replay the validation energy swings between early epochs, and the product of MAEs
    # can keep an early epoch whose force error is far from the best.
    select_epoch_by: EpochSelection = EpochSelection.objective
    grad_clip_norm: float = 1.0  # gradients clipped to this norm
    loss: str = "mse"  # metatrain's loss type: mse, mae, huber, ...
    loss_weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)
    dtype: str = "float32"  # what metatrain's PET trains in


class ObjectiveMode(str, Enum):
    constrained = "constrained"  # minimise `metric` subject to the retained-accuracy bound
    pareto = "pareto"  # minimise (`metric`, `retained_metric`): the Pareto front


@dataclass
class ObjectiveConfig:
    mode: ObjectiveMode = ObjectiveMode.constrained  # constrained | pareto
    # null: follows the data (sweeper/objective.py): the validation force MAE, or the
    # energy MAE for energy-only data
    metric: str | None = None
    # null: the force-MAE ratio on the original set (energy ratio for energy-only data);
    # none without an original set, and the study optimises `metric` alone
    retained_metric: str | None = None
    retained_tolerance: float = 0.2  # feasible: retained_metric <= 1 + tolerance


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # sqlite:///..., postgresql://... or an http:// server
    experiment: str = "pet-lora"  # the MLflow experiment of every run
    run_name: str | None = None  # default: says what the trial is, e.g. `r8 a16 lr1e-3`
    system_metrics: bool = False  # CPU/memory (and GPU with nvidia-ml-py) every 10 s


@dataclass
class RegistryConfig:
    enabled: bool = True  # register every finished, feasible trial's adapter as a model version
    model_name: str | None = None  # null: `<base checkpoint file stem>-lora`, e.g. base_pet_cu-lora


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    seed: int = 0  # metatrain's seed and the replay draws: same seed and threads, same numbers
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Share of the GPU's memory a trial may allocate (null: all of it). With several workers per
    # GPU, the one that outgrows its share fails alone, out of memory. Ignored on the CPU.
    gpu_memory_fraction: float | None = None
    threads: int | None = None  # torch threads; null: every core this process may use
    verbose: bool = False  # metatrain's log on the console too (always in the trial's trial.log)


def replay_batch(cfg: Config) -> tuple[int, str]:
    """Structures per replayed batch, and the key that sets it: finetune.replay.batch_size, else
    train.batch_size."""
    if cfg.finetune.replay.batch_size is not None:
        return cfg.finetune.replay.batch_size, "finetune.replay.batch_size"
    return cfg.train.batch_size, "train.batch_size"


def register() -> None:
    OmegaConf.register_new_resolver("embedded", embedded.resolve, replace=True)
    ConfigStore.instance().store(name="base_config", node=Config)


def composed(overrides: list[str] | None = None) -> Any:
    """conf/ as a run composes it, for the command-line tools outside Hydra's main."""
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def flatten(cfg: Config) -> dict[str, str]:
    """The resolved config as `a.b.c -> value` strings, for MLflow params (URL passwords masked)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = redact(str(node))

    walk("", container)
    return flat
