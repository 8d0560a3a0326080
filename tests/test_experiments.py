"""Presets as data (conf/experiment/): each composes to what it says, and runs as users run it."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.studies import sweep_study
from helpers.sweeps import merged, run_cli, tiny_overrides
from helpers.tracking import runs

from sweeper import config, rules

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

PRESETS = sorted(
    str(path.relative_to(config.CONF_DIR / "experiment").with_suffix(""))
    for path in (config.CONF_DIR / "experiment").rglob("*.yaml")
)
FORGETTING = {  # what each forgetting row changes from the defaults
    "forgetting/lora": {
        "lora.rank": 16,
        "lora.target_modules": ["input_linear", "output_linear"],  # as measured, not the default
        "train.epochs": 40,
        "finetune.replay.structures": 0,
    },
    "forgetting/lora_replay": {"lora.rank": 16, "finetune.replay.structures": 64},
    "forgetting/lora_replay_separate": {"finetune.replay.structures": 64, "finetune.replay.head": "separate"},
    "forgetting/lora_ffn": {"lora.target_modules": ["input_linear", "output_linear", "w_in", "w_out"]},
    "forgetting/lora_ffn_replay": {"finetune.replay.structures": 32, "finetune.replay.pool": 96},
    "forgetting/full": {"finetune.method": "full", "train.lr": 3.5e-4},
    "forgetting/full_replay": {"finetune.method": "full", "finetune.replay.repeat": 2},
    "forgetting/heads": {"finetune.method": "heads", "train.epochs": 40},
    "forgetting/lora_ffn_anchor": {"finetune.anchor.weight": 1e-3, "lora.rank": 16},
}


def _select(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    value = getattr(node, "value", node)
    return list(value) if not isinstance(value, (str, int, float)) else value


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_passes_the_checks(preset) -> None:
    cfg = config.composed([f"experiment={preset}"])
    rules.check(cfg)
    for key, value in FORGETTING.get(preset, {}).items():
        assert _select(cfg, key) == value, key


def test_the_presets_the_docs_promise_exist() -> None:
    assert {"smoke", "replay_sweep", "gpu_box", "cluster", *FORGETTING} <= set(PRESETS)


def _sweep(tiny_data, embedded_paths, workdir: Path, *arguments: str):
    """A preset's sweep on tiny data (the embedded original set, so that replay has room)."""
    defaults = [*tiny_overrides(tiny_data, workdir), f"data.original.path={embedded_paths['original']}",
                "data.original.max_structures=2", "train.epochs=1"]  # fmt: skip
    done = run_cli(["-m", *merged(defaults, list(arguments))], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_smoke_preset_runs_its_two_trials(tiny_data, embedded_paths, tmp_path) -> None:
    _sweep(tiny_data, embedded_paths, tmp_path, "experiment=smoke", "train.epochs=2")
    complete = [t for t in sweep_study(tmp_path).trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    children = [r for r in runs(tmp_path) if "trial_number" in r.data.tags]
    assert {r.data.params["train.epochs"] for r in children} == {"2"}


def test_the_replay_sweep_preset_searches_replay_on_a_pareto_front(
    tiny_data, embedded_paths, tmp_path
) -> None:
    _sweep(tiny_data, embedded_paths, tmp_path, "experiment=replay_sweep", "hydra.sweeper.n_trials=2")
    study = sweep_study(tmp_path)
    assert len(study.directions) == 2
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2 and all(
        t.params["finetune.replay.structures"] in (0, 16, 32, 64) for t in complete
    )
    (parent,) = [r for r in runs(tmp_path) if r.data.tags.get("role") == "study"]
    assert "multivariate=True" in parent.data.params["sampler"]
    children = {r.info.run_id: r for r in runs(tmp_path) if "trial_number" in r.data.tags}
    for t in complete:
        run = children[t.user_attrs["run_id"]]
        assert (
            run.data.params["finetune.replay.pool"] == "96"
            and "w_in" in run.data.params["lora.target_modules"]
        )


def test_a_forgetting_row_runs_as_the_benchmark_runs_it(tiny_data, embedded_paths, tmp_path) -> None:
    tiny = [a for a in tiny_overrides(tiny_data, tmp_path) if not a.startswith("lora.rank")]  # the preset's
    defaults = [*tiny, f"data.original.path={embedded_paths['original']}", "data.original.max_structures=2"]
    done = run_cli(
        merged(defaults, ["experiment=forgetting/lora_ffn_replay", "train.epochs=1"]), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.data.params["finetune.replay.structures"] == "32" and run.data.params["lora.rank"] == "16"
    assert run.info.run_name == "r16 a34.6 lr2e-3 replay32of96"


def test_the_gpu_box_preset_runs_its_workers_on_the_cpu_too(tiny_data, embedded_paths, tmp_path) -> None:
    done = _sweep(
        tiny_data, embedded_paths, tmp_path, "experiment=gpu_box", "hydra.sweeper.n_trials=2", "device=cpu"
    )
    assert "2 workers" in done.stdout
    assert len([t for t in sweep_study(tmp_path).trials if t.state.name == "COMPLETE"]) == 2
