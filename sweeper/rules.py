"""The value rules a type cannot say (rank >= 1, lr > 0, ...): checked before any expensive work,
each failure one line naming the key (the schema and its types: sweeper/config.py)."""

from __future__ import annotations

import math
import re

from omegaconf import OmegaConf

from sweeper import devices
from sweeper.config import Config, ConfigError, Method, ReplayHead, replay_batch


def check(cfg: Config) -> None:
    """Value rules beyond types; raises ConfigError naming the key."""
    structures = cfg.finetune.replay.structures
    batch, batch_key = replay_batch(cfg)
    rules = [
        ("lora.rank", cfg.lora.rank >= 1, "must be >= 1"),
        (
            "model.sha256",
            cfg.model.sha256 is None or re.fullmatch(r"[0-9a-fA-F]{64}", str(cfg.model.sha256)) is not None,
            "must be 64 hexadecimal digits (sha256sum of the checkpoint) or null",
        ),
        ("lora.alpha", cfg.lora.alpha > 0, "must be > 0"),
        ("lora.target_modules", len(cfg.lora.target_modules) > 0, "must name at least one module"),
        ("train.lr", cfg.train.lr > 0 and math.isfinite(cfg.train.lr), "must be > 0"),
        ("train.epochs", cfg.train.epochs >= 1, "must be >= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.warmup_fraction", 0 <= cfg.train.warmup_fraction < 1, "must be in [0, 1)"),
        ("train.step_size", cfg.train.step_size >= 1, "must be >= 1"),
        ("train.gamma", 0 < cfg.train.gamma <= 1, "must be in (0, 1]"),
        ("train.weight_decay", cfg.train.weight_decay is None or cfg.train.weight_decay >= 0, "must be >= 0"),
        (
            "train.early_stopping_patience",
            cfg.train.early_stopping_patience is None or cfg.train.early_stopping_patience >= 1,
            "must be >= 1 or null",
        ),
        (
            "train.dtype",
            cfg.train.dtype == "float32",
            "must be float32 (what metatrain's PET trains in here)",
        ),
        (
            "data.finetune.validation_fraction",
            cfg.data.finetune.validation is not None or 0 < cfg.data.finetune.validation_fraction < 1,
            "must be in (0, 1) when data.finetune.validation is null",
        ),
        (
            "data.original.max_structures",
            cfg.data.original.max_structures is None or cfg.data.original.max_structures >= 1,
            "must be >= 1 or null",
        ),
        ("finetune.replay.structures", structures is None or structures >= 0, "must be >= 0 or null"),
        (
            "finetune.replay.batch_size",
            cfg.finetune.replay.batch_size is None or cfg.finetune.replay.batch_size >= 1,
            "must be >= 1 or null",
        ),
        (
            "finetune.replay.structures",
            structures in (None, 0) or structures >= batch,
            f"must be 0 (off) or at least {batch_key} {batch} (metatrain drops a "
            "training set's last partial batch)",
        ),
        ("finetune.replay.repeat", cfg.finetune.replay.repeat >= 1, "must be >= 1"),
        (
            "finetune.replay.head",
            cfg.finetune.replay.head == ReplayHead.shared
            or (structures != 0 and cfg.finetune.method != Method.heads),
            "can be separate only with replay (finetune.replay.structures > 0) and "
            "finetune.method lora or full",
        ),
        (
            "finetune.replay.pool",
            cfg.finetune.replay.pool is None or cfg.finetune.replay.pool >= (structures or 0),
            f"must be null or at least finetune.replay.structures {cfg.finetune.replay.structures} "
            "(the pool each epoch's replay is drawn from)",
        ),
        (
            "finetune.anchor.weight",
            cfg.finetune.anchor.weight >= 0 and math.isfinite(cfg.finetune.anchor.weight),
            "must be >= 0",
        ),
        (
            "finetune.replay.structures",
            structures in (None, 0) or cfg.data.original.path is not None,
            "needs an original set to draw from (data.original.path is null)",
        ),
        ("device", devices.NAMES.fullmatch(cfg.device) is not None, "must be auto, cpu, cuda or cuda:N"),
        (
            "gpu_memory_fraction",
            cfg.gpu_memory_fraction is None or 0 < cfg.gpu_memory_fraction <= 1,
            "must be in (0, 1] or null",
        ),
        ("threads", cfg.threads is None or cfg.threads >= 1, "must be >= 1 or null"),
        ("objective.retained_tolerance", cfg.objective.retained_tolerance >= 0, "must be >= 0"),
        *(
            (f"train.loss_weights.{name}", cfg.train.loss_weights[name] >= 0, "must be >= 0")
            for name in ("energy", "forces", "stress")
        ),
        *(
            (
                f"data.{role}.stress",
                not (cfg.data[role].stress and cfg.data[role].virial),
                f"and data.{role}.virial cannot both be true (metatrain trains one of them)",
            )
            for role in ("finetune", "original")
        ),
    ]
    for key, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{key} {rule}, got {OmegaConf.select(cfg, key)!r}")
