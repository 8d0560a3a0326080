"""The schema (sweeper/config.py) is the single source of every key and default: a file of conf/
says only what its option changes, and names no key the schema lacks."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import yaml

from sweeper import config

# conf/ files that configure Hydra itself or Optuna objects, not the trial's schema.
NOT_THE_SCHEMA = ("hydra",)


def _schema_files() -> list[Path]:
    return sorted(
        path
        for path in config.CONF_DIR.rglob("*.yaml")
        if path.relative_to(config.CONF_DIR).parts[0] not in NOT_THE_SCHEMA
    )


def _node(path: Path) -> Any:
    """The schema dataclass instance a conf/ file is merged into."""
    parts = path.relative_to(config.CONF_DIR).parts
    root = config.Config()
    global_package = path.read_text().startswith("# @package _global_")  # presets: conf/experiment/
    return root if len(parts) == 1 or global_package else getattr(root, parts[0])


def _leaves(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    found = []
    for key, value in mapping.items():
        if key == "defaults" or (not prefix and key == "hydra"):
            continue
        name = f"{prefix}{key}"
        found += _leaves(value, f"{name}.") if isinstance(value, dict) else [(name, value)]
    return found


def _default(node: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not dataclasses.is_dataclass(node) or key not in {f.name for f in dataclasses.fields(node)}:
            raise KeyError(dotted)
        node = getattr(node, key)
    return node.value if isinstance(node, Enum) else node


@pytest.mark.parametrize("path", _schema_files(), ids=lambda p: str(p.relative_to(config.CONF_DIR)))
def test_a_conf_file_says_only_what_its_option_changes(path: Path) -> None:
    node = _node(path)
    for key, value in _leaves(yaml.safe_load(path.read_text()) or {}):
        try:
            default = _default(node, key)
        except KeyError:
            pytest.fail(f"{path.name}: {key} is not a key of the schema (sweeper/config.py)")
        assert value != default, f"{path.name}: {key}: {value!r} repeats the schema's default"


def test_the_check_finds_a_repeated_default_and_an_unknown_key(tmp_path: Path) -> None:
    node = config.Config().train
    assert _default(node, "epochs") == 20
    with pytest.raises(KeyError):
        _default(node, "epochz")
    assert [k for k, _ in _leaves({"loss_weights": {"forces": 2.0}, "lr": 1e-3})] == [
        "loss_weights.forces",
        "lr",
    ]
