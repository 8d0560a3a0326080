"""One LoRA fine-tuning trial, top to bottom.

First everything that can be wrong with the input is checked (config values, files and
their labels, the checkpoint, species, target modules, device, tracking server), so bad
input fails in seconds with one line and no MLflow run. Then, inside one MLflow run:
inject the adapter, train with metatrain's PET trainer in-process, keep the best
validation epoch, evaluate it on the fine-tuning and original sets, save the adapter.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from sweeper import (
    adapter,
    base_model,
    config,
    data,
    devices,
    energy_reference,
    evaluate,
    objective,
    provenance,
    replay,
    rules,
    secrets,
    signals,
    tracking,
    train,
)
from sweeper import metatrain as mtt
from sweeper.config import Config, ConfigError, EnergyReference, Method, ReplayConfig, ReplayHead
from sweeper.registry import versions

if TYPE_CHECKING:
    from sweeper.search.membership import Membership

EpochCallback = train.EpochCallback


@dataclass
class TrialResult:
    metrics: dict[str, float]
    run_id: str
    experiment_id: str
    artifact_uri: str
    adapter_dir: Path
    best_epoch: int
    epochs_run: int
    goal: objective.Goal
    base_targets: list[str]  # what the base model predicted
    targets: list[str]  # what the adapted model predicts (lora/full drop the untrained ones)
    registered: str | None = None  # `name/version` in the model registry
    # the replay the trial ran: `structures` and `pool` of the default made numbers
    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(structures=0))


def run(
    cfg: Config,
    output_dir: Path,
    on_epoch: EpochCallback | None = None,
    log_file: Path | None = None,
    on_start: Callable[[str], None] | None = None,
    membership: Membership | None = None,
) -> TrialResult:
    """One trial; `membership`: its study, when a sweep runs it (sweeper/search/membership.py)."""
    # --- 1. input checks: cheap, before any training or tracking ---------------------
    cfg = replay.resolved(cfg)  # the default replay made a number; then every rule, once
    rules.check(cfg)
    goal = objective.goal(cfg)
    device = devices.resolve(cfg.device)
    devices.cap_memory(device, cfg.gpu_memory_fraction)
    threads = cfg.threads or devices.usable_cores()
    torch.set_num_threads(threads)  # same seed and thread count: same bits
    species = data.check(cfg)
    replay_indices: list[int] = []
    if replay.wanted(cfg):
        species["replay"], replay_indices = replay.check(cfg)
    mtt.seed_everything(cfg.seed)  # seed, read data, load model: `mtt train`'s order
    datasets = data.load(cfg)
    if len(datasets.train) < cfg.train.batch_size:  # metatrain would fail once the run started
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} is more than the {len(datasets.train)} training "
            "structures of data.finetune.train"
        )
    base, base_sha = base_model.load(cfg.model)
    base_model.check_compatible(cfg, base, species)
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    base_targets = mtt.model_targets(base)

    # --- 2. the tracked work ------------------------------------------------------------
    tags = provenance.tags(cfg, base_sha, datasets, device, threads, base_targets, membership)
    params = config.flatten(cfg) | provenance.original_sizes(datasets, replay_indices)
    with tracking.trial_run(
        experiment_id,
        cfg.tracking.run_name or provenance.run_name(cfg, membership),
        params,
        tags,
        cfg.tracking.system_metrics,
        log_file,
        parent_run_id=membership.parent_run_id if membership is not None else None,
    ) as trial:
        if on_start is not None:
            on_start(trial.run_id)
        # First, so that a pruned or failed trial's run also says what it ran; no URL passwords.
        trial.log_text(secrets.redact(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
        # Training and evaluation: a signal stops them at a safe point, not inside native code.
        with signals.deferred():
            done = _train_and_evaluate(cfg, trial, base, base_sha, datasets, device, on_epoch)
        adapter_dir = output_dir / "adapter"
        adapter.save(
            adapter_dir,
            done.tensors,
            method=Method(cfg.finetune.method).value,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            target_modules=list(cfg.lora.target_modules),
            init=str(config.LoraInit(cfg.lora.init).value),
            base_checkpoint_sha256=base_sha,
            atomic_types=mtt.model_atomic_types(done.model),
            targets=done.targets,
            base_targets=base_targets,
            energy_offsets=done.offsets,
        )
        trial.log_metrics(done.metrics)
        trial.log_artifacts(adapter_dir, "adapter")
        trial.set_tags({"stopped_early": str(done.epochs_run < cfg.train.epochs).lower()})
        registered = versions.register_trial(
            cfg, goal, trial, done.metrics, adapter_dir, base_sha, experiment_id, membership
        )
        return TrialResult(
            metrics=done.metrics,
            run_id=trial.run_id,
            experiment_id=experiment_id,
            artifact_uri=trial.artifact_uri,
            adapter_dir=adapter_dir,
            best_epoch=done.best_epoch,
            epochs_run=done.epochs_run,
            goal=goal,
            base_targets=base_targets,
            targets=done.targets,
            registered=registered,
            replay=cfg.finetune.replay,
        )


@dataclass
class _Trained:
    """The adapted model at its best validation epoch, and what the trial measured."""

    model: mtt.PET
    offsets: dict[int, float]  # per-element energy shifts of `energy_reference=refit`
    targets: list[str]
    best_epoch: int
    epochs_run: int
    metrics: dict[str, float]
    tensors: dict[str, torch.Tensor]  # the adapter's: what trained, as the deployed model names it


def _train_and_evaluate(
    cfg: Config,
    trial: tracking.TrialRun,
    base: mtt.PET,
    base_sha: str,
    datasets: data.Datasets,
    device: torch.device,
    on_epoch: EpochCallback | None,
) -> _Trained:
    """Adapt the base, fine-tune it with metatrain's trainer, evaluate its best epoch."""
    method = Method(cfg.finetune.method).value
    labels = datasets.labels["finetune"]
    offsets = _energy_offsets(cfg, base, datasets, device)  # of the base, before it is adapted
    separate = ReplayHead(cfg.finetune.replay.head) == ReplayHead.separate
    # A separate head leaves the replayed data to the base's head, in the base's reference.
    replay_offsets = {} if separate else offsets
    replayed = replay.load(cfg, cfg.model.checkpoint, replay_offsets, device) if replay.wanted(cfg) else None
    trial.log_text(provenance.original_indices(datasets, replayed), "original_indices.json")
    trial.log_datasets(provenance.dataset_files(cfg, datasets, replayed))
    strategy = mtt.finetune_strategy(
        method, cfg.model.checkpoint, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.target_modules)
    )
    info = mtt.dataset_info(mtt.model_atomic_types(base), datasets.target_info, labels.length_unit)
    if separate:  # the new head starts as a copy of the base's (metatrain's inherit_heads)
        info, strategy["inherit_heads"] = mtt.heads.with_head(info), {mtt.HEAD: mtt.ENERGY_TARGET}
    zero_b = method == "lora" and cfg.lora.init == config.LoraInit.zero
    model = mtt.apply_strategy(mtt.restart_for(base, info), strategy, zero_lora_b=zero_b)
    new_head = mtt.heads.start_as_base(mtt.heads.unfreeze(model), offsets) if separate else None
    mtt.add_energy_offsets(model, replay_offsets)  # separate: after training, to the deployed head
    total, trainable = mtt.parameter_count(model)
    targets = [name for name in mtt.model_targets(model) if name != mtt.HEAD]
    trial.log_metrics({"parameters": total, "trainable_parameters": trainable})
    trial.set_tags({"targets": ",".join(targets)})

    clock = _EpochClock()

    def each_epoch(epoch: int, row: dict[str, float]) -> None:
        signals.raise_pending()
        clock.tick()
        trial.log_metrics({f"epoch/{name}": value for name, value in row.items()}, step=epoch)
        if replayed is not None:
            replayed.set_epoch(epoch + 1)
        if on_epoch is not None:
            on_epoch(epoch, row)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pet-lora-trial-") as workdir:
        result = train.fine_tune(
            model,
            cfg,
            strategy,
            [labels] + ([replayed.labels] if replayed else []),
            [_as_new_head(datasets.train, separate)] + (replayed.training_sets() if replayed else []),
            [_as_new_head(datasets.validation, separate)],
            device,
            Path(workdir),
            each_epoch,
            new_head,
        )
    train_seconds = time.perf_counter() - start
    mtt.load_state(model, result.state)

    start = time.perf_counter()
    metrics = {}
    if separate:  # the base's head, trained on the replayed data; then the new head takes its place
        before = evaluate.trial_metrics(cfg, model, datasets, device, base_sha, {})
        metrics |= {f"replay_head_{name}": v for name, v in before.items() if name.startswith("retained_")}
        mtt.heads.deploy(model)
        mtt.add_energy_offsets(model, offsets)
    metrics |= evaluate.trial_metrics(cfg, model, datasets, device, base_sha, offsets)
    metrics |= energy_reference.as_metrics(offsets, labels.energy_unit)
    metrics |= {
        "train_batches_per_epoch": result.batches_per_epoch[0],
        "replay_batches_per_epoch": sum(result.batches_per_epoch[1:]),
        "best_epoch": result.best_epoch,
        "epochs_run": result.last_epoch + 1,
        "train_seconds": train_seconds,
        "evaluation_seconds": time.perf_counter() - start,
    }
    if device.type == "cuda":  # training and evaluation: what sizes workers_per_gpu
        metrics["peak_gpu_memory_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
    if clock.seconds_per_epoch() is not None:
        metrics["seconds_per_epoch"] = clock.seconds_per_epoch()
    tensors = mtt.trainable_tensors(model)
    tensors = mtt.heads.as_energy_head(tensors) if separate else tensors  # the new head, as deployed
    return _Trained(model, offsets, targets, result.best_epoch, result.last_epoch + 1, metrics, tensors)


def _as_new_head(dataset: mtt.Dataset, separate: bool) -> mtt.Dataset:
    return mtt.heads.renamed(dataset) if separate else dataset


def _energy_offsets(
    cfg: Config, base: mtt.PET, datasets: data.Datasets, device: torch.device
) -> dict[int, float]:
    """`energy_reference=refit`: per-element offsets of the data against the base model."""
    if EnergyReference(cfg.data.finetune.energy_reference) != EnergyReference.refit:
        return {}
    return energy_reference.fit(base, datasets.train, device)


class _EpochClock:
    """Mean seconds between epoch rows: per-epoch cost without the set-up."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def seconds_per_epoch(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)
