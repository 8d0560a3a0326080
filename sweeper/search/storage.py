"""The study's storage: opened once per controller, with heartbeats, and closed when it stops;
the study in it, with the directions of its objectives."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optuna

from sweeper.search.grammar import SearchSpaceError


def rdb(url: str, heartbeat_interval: int, on_stale: Callable[..., None]) -> Any:
    """An RDB storage keeps heartbeats of running trials, so dead workers are noticed, and
    checks its pooled connections before use, so it survives a database restart."""
    if not url.startswith(("sqlite", "postgresql", "mysql")):
        return url
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={} if url.startswith("sqlite") else {"pool_pre_ping": True},
            heartbeat_interval=heartbeat_interval,
            grace_period=3 * heartbeat_interval,
            heartbeat_stale_trial_callback=on_stale,
        )


def directions(direction: Any, pareto: bool) -> list[str]:
    """`hydra.sweeper.direction` as one direction per objective: one value serves both of pareto's."""
    mode = "pareto" if pareto else "constrained"
    found = list(direction) if isinstance(direction, list | tuple) else [direction]
    found = [str(getattr(d, "name", d)) for d in found]
    wanted = 2 if pareto else 1
    if len(found) == 1:
        found *= wanted
    if len(found) != wanted:
        raise SearchSpaceError(
            f"hydra.sweeper.direction: {len(found)} directions for objective={mode} ({wanted} objectives)"
        )
    return found


def open_study(
    name: str, storage: Any, directions: list[str], pruner: optuna.pruners.BasePruner
) -> tuple[optuna.Study, bool]:
    """The study, and whether this controller created it (call it under the study lock)."""
    settings = {"study_name": name, "storage": storage, "pruner": pruner}
    try:
        return optuna.create_study(directions=directions, **settings), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**settings), False


def release(study: optuna.Study) -> None:
    """Close the storage's database connections (a stopped controller holds none)."""
    engine = getattr(study._storage, "engine", None)
    if engine is not None:
        engine.dispose()
