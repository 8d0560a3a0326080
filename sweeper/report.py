"""What a trial prints when it ends: the errors that matter and where everything is."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tqdm import tqdm

from sweeper import config, tracking
from sweeper.secrets import redact
from sweeper.trial import EpochCallback, TrialResult

if TYPE_CHECKING:
    from sweeper.config import Config

# What the epoch bar shows of a row, when the data has it.
EPOCH_ERRORS = {
    "val_energy_mae_meV_per_atom": "E {:.1f} meV/atom",
    "val_force_mae_meV_per_A": "F {:.1f} meV/Å",
    "val_virial_mae_meV_per_atom": "virial {:.1f} meV/atom",
}


@contextlib.contextmanager
def epoch_bar(cfg: Config) -> Iterator[EpochCallback]:
    """A single trial's progress: one bar over the epochs with the current validation MAEs."""
    with tqdm(total=cfg.train.epochs, desc="fine-tuning", unit="epoch") as bar:

        def each_epoch(epoch: int, row: dict[str, float]) -> None:
            shown = [text.format(row[name]) for name, text in EPOCH_ERRORS.items() if name in row]
            bar.set_postfix_str("val MAE " + ", ".join(shown), refresh=False)
            bar.update(1)

        yield each_epoch


def log_to_console() -> None:
    """`verbose=true`: the whole log (metatrain's included) on the console, not only warnings."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.INFO)


def summary(cfg: Config, result: TrialResult) -> str:
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
        retained = result.goal.retained_metric
        if retained is not None and retained.endswith("_ratio") and retained in m:
            what = retained.removeprefix("retained_").removesuffix("_ratio").replace("_", " ").upper()
            what = what.replace("ENERGY", "energy").replace("FORCE", "force").replace("STRESS", "stress")
            lines.append(f"  retained {what}: {m[retained]:.2f} x the base model's")
    else:
        lines.append("  no original set: retained accuracy not measured")
    mixed = result.replay  # resolved: the default's numbers, not `cfg`'s nulls
    if mixed.structures:
        drawn = f" drawn each epoch from {mixed.pool}" if mixed.pool is not None else ""
        batches = f"batches of {config.replay_batch(cfg)[0]}"
        lines.append(
            f"  replay: {mixed.structures} structures{drawn} of the original set ({mixed.labels.value} "
            f"labels, {batches}, x{mixed.repeat} per epoch), disjoint from those above"
        )
    if cfg.finetune.anchor.weight:
        lines.append(f"  anchored toward the base: L2-SP weight {cfg.finetune.anchor.weight:g}")
    offsets = {name: value for name, value in m.items() if name.startswith("energy_offset_")}
    if offsets:
        shown = ", ".join(f"{name.split('_')[2]} {value:+.1f}" for name, value in offsets.items())
        lines.append(f"  energy reference refit: {shown} meV/atom (taken out on the original set)")
    dropped = [name for name in result.base_targets if name not in result.targets]
    if dropped:
        lines.append(
            f"  targets: {', '.join(result.targets)} (the base's {', '.join(dropped)} dropped: "
            "not trained, not exported)"
        )
    lines += [
        f"MLflow run   {result.run_id}  ({redact(cfg.tracking.uri)}, experiment {cfg.tracking.experiment!r})",
        f"             browse: {_browse(cfg, result)}",
        f"adapter      {result.adapter_dir}  (logged at {result.artifact_uri}/adapter)",
    ]
    if result.registered is not None:
        name, version = result.registered.rsplit("/", 1)
        lines.append(f"registered   models:/{name}/{version}  (promote the best: python -m sweeper.promote)")
    return "\n".join(lines)


def _browse(cfg: Config, result: TrialResult) -> str:
    return tracking.ui_link(cfg.tracking.uri, f"#/experiments/{result.experiment_id}/runs/{result.run_id}")


def _row(label: str, m: dict[str, float], prefix: str) -> str:
    text = f"  {label:<28} energy MAE {m[f'{prefix}_energy_mae_meV_per_atom']:8.2f} meV/atom"
    if f"{prefix}_force_mae_meV_per_A" in m:
        text += f"   force MAE {m[f'{prefix}_force_mae_meV_per_A']:8.2f} meV/Å"
    if f"{prefix}_stress_mae_meV_per_A3" in m:
        text += f"   stress MAE {m[f'{prefix}_stress_mae_meV_per_A3']:8.3f} meV/Å³"
    return text
