"""The config tree: schema rejects typos and wrong types; value rules name the key."""

from __future__ import annotations

import pytest
from helpers import REPO
from helpers.sweeps import compose_config, run_cli
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from sweeper import config, rules
from sweeper.config import ConfigError


def test_defaults_compose_to_the_documented_keys() -> None:
    cfg = compose_config([])
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 32.0
    assert list(cfg.lora.target_modules) == ["input_linear", "output_linear", "w_in", "w_out"]
    assert list(compose_config(["lora=attention"]).lora.target_modules) == ["input_linear", "output_linear"]
    assert cfg.lora.init == config.LoraInit.zero
    assert cfg.finetune.method == config.Method.lora
    assert cfg.train.scheduler == config.Scheduler.cosine
    assert cfg.tracking.uri == "sqlite:///mlflow.db"
    assert cfg.device == "auto"
    assert cfg.model.checkpoint.endswith("base_pet_cu.ckpt")
    rules.check(cfg)


@pytest.mark.parametrize("method", ["full", "heads"])
def test_finetune_group_selects_the_method(method: str) -> None:
    assert compose_config([f"finetune={method}"]).finetune.method.value == method


@pytest.mark.parametrize(
    "override",
    ["lora.ranks=4", "train.learning_rate=1e-3", "trackin.uri=x"],
)
def test_unknown_key_is_rejected_when_composing(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


@pytest.mark.parametrize(
    "override", ["lora.rank=four", "train.epochs=2.5", "lora.init=random", "train.scheduler=linear"]
)
def test_wrong_type_or_choice_is_rejected_when_composing(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora.rank=0", "lora.rank"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.alpha=-1", "lora.alpha"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-3", "train.lr"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.early_stopping_patience=0", "train.early_stopping_patience"),
        ("device=tpu", "device"),
        ("device=cuda:x", "device"),
        ("threads=0", "threads"),
        ("lora.target_modules=[]", "lora.target_modules"),
    ],
)
def test_value_rules_name_the_key(override: str, key: str) -> None:
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=f"^{key} "):
        rules.check(cfg)


def test_flatten_gives_dotted_resolved_strings() -> None:
    flat = config.flatten(compose_config(["lora.rank=4"]))
    assert flat["lora.rank"] == "4"
    assert flat["lora.init"] == "zero"
    assert flat["model.checkpoint"].endswith("base_pet_cu.ckpt")  # resolved, not ${...}


def test_cli_prints_composed_config_and_help(tmp_path) -> None:
    shown = run_cli(["--cfg", "job", "lora.rank=4"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert OmegaConf.create(shown.stdout).lora.rank == 4
    helped = run_cli(["--help"], cwd=tmp_path)
    assert helped.returncode == 0
    for group in ("model:", "data:", "lora:", "train:", "tracking:", "finetune:"):
        assert group in helped.stdout
    assert not (tmp_path / "mlflow.db").exists()
    assert (REPO / "conf" / "config.yaml").is_file()


def test_passwords_in_urls_never_reach_mlflow_params() -> None:
    cfg = compose_config(
        [
            "tracking.uri=http://admin:s3cret-pass@mlflow:5000",
            "data.finetune.train=https://u:pw%21x@data.example/train.xyz",
        ]
    )
    flat = config.flatten(cfg)
    assert flat["tracking.uri"] == "http://admin:***@mlflow:5000"
    assert flat["data.finetune.train"] == "https://u:***@data.example/train.xyz"
    assert not any("s3cret" in value or "pw%21x" in value for value in flat.values())
    assert "s3cret" not in config.redact(OmegaConf.to_yaml(cfg, resolve=True))  # the logged config.yaml
