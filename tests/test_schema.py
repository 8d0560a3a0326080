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
    assert _default(node, "epochs") == 40
    with pytest.raises(KeyError):
        _default(node, "epochz")
    assert [k for k, _ in _leaves({"loss_weights": {"forces": 2.0}, "lr": 1e-3})] == [
        "loss_weights.forces",
        "lr",
    ]


SAMPLERS = ("tpe", "motpe", "random", "grid", "gp", "cmaes", "nsgaii", "qmc")
PRUNERS = ("median", "hyperband", "successive_halving", "none")


def _sweeper_node(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    config.register()
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True).hydra.sweeper


def test_samplers_and_pruners_are_typed_configs_not_files() -> None:
    from hydra.core.config_store import ConfigStore

    from hydra_plugins.pet_lora_sweeper import optuna_config

    store = ConfigStore.instance()
    for group, names in ((optuna_config.SAMPLERS, SAMPLERS), (optuna_config.PRUNERS, PRUNERS)):
        assert sorted(store.list(group)) == sorted(f"{name}.yaml" for name in names)
        assert not (config.CONF_DIR / group).exists(), f"conf/{group}/ would shadow the typed configs"


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_composes_and_instantiates_seeded(name: str) -> None:
    import optuna
    from hydra.utils import instantiate

    from sweeper.search import samplers

    factory = instantiate(_sweeper_node([f"hydra/sweeper/sampler={name}", "seed=7"]).sampler)
    assert factory.keywords["seed"] == 7  # `${seed}`, resolved at the root
    assert samplers.is_grid(factory) == (name == "grid")
    space = {"lora.rank": optuna.distributions.CategoricalDistribution([4, 8])}
    assert isinstance(samplers.build(factory, space), optuna.samplers.BaseSampler)


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_composes_and_instantiates(name: str) -> None:
    import optuna
    from hydra.utils import instantiate

    pruner = instantiate(_sweeper_node([f"hydra/sweeper/pruner={name}"]).pruner)
    assert isinstance(pruner, optuna.pruners.BasePruner)


def test_objective_pareto_picks_motpe_and_the_command_line_wins() -> None:
    assert _sweeper_node([]).sampler.n_startup_trials == 5 and "multivariate" not in _sweeper_node([]).sampler
    assert _sweeper_node(["objective=pareto"]).sampler.multivariate is True
    chosen = _sweeper_node(["objective=pareto", "hydra/sweeper/sampler=random"]).sampler
    assert chosen._target_ == "optuna.samplers.RandomSampler"


def test_a_typo_in_a_sampler_key_is_rejected() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _sweeper_node(["hydra.sweeper.sampler.n_startup_trial=3"])
