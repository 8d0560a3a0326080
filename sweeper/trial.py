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
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sweeper import adapter, config, data, devices, evaluate, objective, pet, registry, tracking, train
from sweeper.config import ConfigError, Method
from sweeper.embedded import file_sha256

EpochCallback = train.EpochCallback


@dataclass
class TrialResult:
    metrics: dict[str, float]
    run_id: str
    artifact_uri: str
    adapter_dir: Path
    best_epoch: int
    epochs_run: int
    registered: str | None = None  # `name/version` in the model registry


def run(
    cfg: Any,
    output_dir: Path,
    on_epoch: EpochCallback | None = None,
    log_file: Path | None = None,
    on_start: Callable[[str], None] | None = None,
) -> TrialResult:
    # --- 1. input checks: cheap, before any training or tracking ---------------------
    config.check(cfg)
    device = devices.resolve(cfg.device)
    threads = cfg.threads or devices.usable_cores()
    torch.set_num_threads(threads)  # same seed and thread count: same bits
    species = data.check(cfg)
    pet.seed_everything(cfg.seed)  # seed, read data, load model: `mtt train`'s order
    datasets = data.load(cfg)
    base = _load_base(cfg.model.checkpoint)
    _check_compatible(cfg, base, species)
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    base_sha = file_sha256(cfg.model.checkpoint)

    # --- 2. the tracked work ------------------------------------------------------------
    method = Method(cfg.finetune.method).value
    labels = data.labels_of(cfg.data.finetune)
    tags = _tags(cfg, base_sha, datasets, device, threads)
    params = config.flatten(cfg)
    with tracking.trial_run(
        experiment_id,
        cfg.tracking.run_name or run_name(cfg),
        params,
        tags,
        cfg.tracking.system_metrics,
        log_file,
        parent_run_id=cfg.sweep.parent_run_id,
    ) as trial:
        if on_start is not None:
            on_start(trial.run_id)
        strategy = pet.finetune_strategy(
            method, cfg.model.checkpoint, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.target_modules)
        )
        info = pet.dataset_info(pet.model_atomic_types(base), datasets.target_info, labels.length_unit)
        zero_b = method == "lora" and cfg.lora.init == config.LoraInit.zero
        model = pet.apply_strategy(pet.restart_for(base, info), strategy, zero_lora_b=zero_b)
        total, trainable = pet.parameter_count(model)
        trial.log_metrics({"parameters": total, "trainable_parameters": trainable})

        clock = _EpochClock()

        def each_epoch(epoch: int, row: dict[str, float]) -> None:
            clock.tick()
            trial.log_metrics({f"epoch/{name}": value for name, value in row.items()}, step=epoch)
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
                labels,
                datasets.train,
                datasets.validation,
                device,
                Path(workdir),
                each_epoch,
            )
        train_seconds = time.perf_counter() - start
        pet.load_state(model, result.state)

        start = time.perf_counter()
        metrics = _evaluate(cfg, model, datasets, device, base_sha)
        metrics |= {
            "best_epoch": result.best_epoch,
            "epochs_run": result.last_epoch + 1,
            "train_seconds": train_seconds,
            "evaluation_seconds": time.perf_counter() - start,
        }
        if device.type == "cuda":  # training and evaluation: what sizes workers_per_gpu
            metrics["peak_gpu_memory_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
        if clock.seconds_per_epoch() is not None:
            metrics["seconds_per_epoch"] = clock.seconds_per_epoch()
        adapter_dir = output_dir / "adapter"
        adapter.save(
            adapter_dir,
            pet.trainable_tensors(model),
            method=method,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            target_modules=list(cfg.lora.target_modules),
            init=str(config.LoraInit(cfg.lora.init).value),
            base_checkpoint_sha256=base_sha,
            atomic_types=pet.model_atomic_types(model),
            targets=pet.model_targets(model),
        )
        trial.log_metrics(metrics)
        trial.log_artifacts(adapter_dir, "adapter")
        trial.log_text(config.redact(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")  # no URL passwords
        trial.set_tags({"stopped_early": str(result.last_epoch + 1 < cfg.train.epochs).lower()})
        registered = _register(cfg, trial, metrics, adapter_dir, base_sha, experiment_id)
        return TrialResult(
            metrics=metrics,
            run_id=trial.run_id,
            artifact_uri=trial.artifact_uri,
            adapter_dir=adapter_dir,
            best_epoch=result.best_epoch,
            epochs_run=result.last_epoch + 1,
            registered=registered,
        )


def _register(
    cfg: Any, trial: tracking.TrialRun, metrics: dict, adapter_dir: Path, base_sha: str, experiment_id: str
) -> str | None:
    """A version in the model registry for a feasible trial; returns `name/version`.

    Runs last, inside the trial's run: a failure here fails the run, and a version only
    exists once its files are uploaded and its tags written.
    """
    if not cfg.registry.enabled:
        return None
    try:
        feasible = objective.constraint(cfg, metrics) <= 0
    except ConfigError:  # no retained metric (data.original.path=null): feasibility unknown
        feasible = False
    if not feasible:
        trial.set_tags({"registered": "false", "registered_reason": "not feasible (or no retained metric)"})
        return None
    name = registry.model_name(cfg)
    version = registry.register(
        trial.client,
        name,
        experiment_id,
        trial.run_id,
        adapter_dir,
        registry.version_tags(cfg, metrics, trial.run_id, adapter_dir, base_sha),
        registry.description(cfg, base_sha),
    )
    trial.set_tags({"registered": "true", "registered_model": name, "registered_version": version.version})
    return f"{name}/{version.version}"


def run_name(cfg: Any) -> str:
    """Says what the trial is: `r8 a16 lr1e-3`, `t3 r8 a16 lr3e-4` in a sweep, `full lr1e-3`."""
    lr = f"lr{cfg.train.lr:.0e}".replace("e-0", "e-").replace("e+0", "e")
    method = Method(cfg.finetune.method).value
    name = f"{method} {lr}" if method != "lora" else f"r{cfg.lora.rank} a{cfg.lora.alpha:.3g} {lr}"
    return name if cfg.sweep.trial_number is None else f"t{cfg.sweep.trial_number} {name}"


def _load_base(checkpoint: str) -> pet.PET:
    if not Path(checkpoint).is_file():
        raise ConfigError(f"model.checkpoint: file not found: {checkpoint}")
    try:
        return pet.load_checkpoint(checkpoint)
    except pet.CheckpointError as error:
        raise ConfigError(f"model.checkpoint: {error}") from None


def _check_compatible(cfg: Any, base: pet.PET, species: dict[str, set[int]]) -> None:
    known = set(pet.model_atomic_types(base))
    for role, found in species.items():
        unknown = sorted(found - known)
        if unknown:
            key = "data.original.path" if role == "original" else f"data.finetune.{role}"
            raise ConfigError(
                f"{key}: atomic numbers {unknown} are unknown to the base model "
                f"(model.checkpoint knows {sorted(known)})"
            )
    if pet.ENERGY_TARGET not in pet.model_targets(base):
        raise ConfigError(
            f"model.checkpoint: the base model has no {pet.ENERGY_TARGET!r} target "
            f"(it has {pet.model_targets(base)})"
        )
    if Method(cfg.finetune.method) == Method.lora:
        candidates = pet.linear_attribute_names(base)
        for name in cfg.lora.target_modules:
            if name not in candidates:
                raise ConfigError(
                    f"lora.target_modules: {name!r} matches no nn.Linear of the base model "
                    f"(some that exist: {sorted(candidates)[:8]})"
                )


def _evaluate(cfg: Any, model: pet.PET, datasets: data.Datasets, device: torch.device, base_sha: str) -> dict:
    metrics = {f"val_{k}": v for k, v in evaluate.errors(model, datasets.validation, device).items()}
    if datasets.test is not None:
        metrics |= {f"test_{k}": v for k, v in evaluate.errors(model, datasets.test, device).items()}
    if datasets.original is not None:
        original = cfg.data.original
        key = {
            "checkpoint_sha256": base_sha,
            "data_sha256": datasets.sha256["original"],
            "max_structures": original.max_structures,
            "subsample_seed": original.subsample_seed,
            "labels": OmegaConf.to_container(original, resolve=True),
            "device": device.type,
            "metatrain": pet.METATRAIN_VERSION,
        }
        base, _ = evaluate.base_errors(Path(cfg.model.checkpoint), datasets.original, device, key)
        retained = evaluate.errors(model, datasets.original, device)
        metrics |= evaluate.retained(retained, base)
    return metrics


def _tags(
    cfg: Any, base_sha: str, datasets: data.Datasets, device: torch.device, threads: int
) -> dict[str, str]:
    tags = {
        "base_checkpoint_sha256": base_sha,
        "finetune_method": Method(cfg.finetune.method).value,
        "metatrain_version": pet.METATRAIN_VERSION,
        "torch_version": torch.__version__,
        "sweeper_version": _package_version(),
        "device": str(device),
        "device_name": devices.describe(device),
        "threads": str(threads),
    }
    tags |= {f"data_{role}_sha256": sha for role, sha in datasets.sha256.items()}
    if cfg.sweep.study_name is not None:
        tags |= {"study_name": cfg.sweep.study_name, "trial_number": str(cfg.sweep.trial_number)}
    commit = tracking.git_commit(Path(__file__).parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _package_version() -> str:
    try:
        return version("pet-lora-sweeper")
    except PackageNotFoundError:
        return "unknown"


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
