"""Forgetting control beyond plain replay: a replay pool drawn afresh each epoch, anchoring toward
the base (L2-SP), and LoRA on the feed-forward layers too. Run as users run them, read back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
from helpers.studies import sweep_study
from helpers.sweeps import compose_config, merged, run_cli, tiny_overrides, trial_cli
from helpers.tracking import runs
from safetensors.torch import load_file

from sweeper import adapter, data, embedded, evaluate, replay, trial
from sweeper import metatrain as mtt

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

TIMINGS = {"train_seconds", "evaluation_seconds", "seconds_per_epoch"}


def _overrides(tiny_data, embedded_paths, workdir: Path, *extra: str) -> list[str]:
    """Tiny fine-tuning data; the embedded original set (160 structures), 2 of them measure
    retention, so that a pool of 12 fits beside them."""
    defaults = [
        *tiny_overrides(tiny_data, workdir),
        f"data.original.path={embedded_paths['original']}",
        "data.original.max_structures=2",
        "train.epochs=3",
        "finetune.replay.structures=0",  # no default replay: each test asks for the replay it tests
    ]
    return merged(defaults, list(extra))


def _adapter_dir(stdout: str) -> Path:
    """The adapter folder the trial summary names."""
    return Path(re.search(r"^adapter\s+(\S+)", stdout, re.MULTILINE).group(1))


def _update_norm(adapter_dir: Path) -> float:
    """Frobenius norm of the LoRA updates scaling x B @ A over every adapted layer."""
    config = adapter.read_config(adapter_dir)
    tensors = load_file(str(adapter_dir / adapter.WEIGHTS_FILE))
    scaling = config["alpha"] / config["rank"]
    total = 0.0
    for name, a in tensors.items():
        if name.endswith("lora_A.weight"):
            b = tensors[name.replace("lora_A", "lora_B")]
            total += float(((scaling * b @ a) ** 2).sum())
    return total**0.5


def test_a_replay_pool_is_drawn_afresh_each_epoch_disjoint_from_retention(
    tiny_data, embedded_paths, tmp_path, monkeypatch
) -> None:
    pool = ("finetune.replay.structures=4", "finetune.replay.pool=12")
    draws: list[tuple[int, list[int]]] = []
    set_epoch = replay.EpochDraw.set_epoch

    def recorded(self, epoch: int) -> None:
        set_epoch(self, epoch)
        draws.append((epoch, list(self.chosen)))

    monkeypatch.setattr(replay.EpochDraw, "set_epoch", recorded)
    inside = tmp_path / "in-process"
    inside.mkdir()
    monkeypatch.chdir(inside)
    result = trial.run(compose_config(_overrides(tiny_data, embedded_paths, inside, *pool)), inside / "out")
    trained = [chosen for epoch, chosen in draws if epoch < 3]  # the last draw is for an epoch not run
    assert len(trained) == 3 and all(len(c) == 4 and set(c) <= set(range(12)) for c in trained)
    assert len({tuple(c) for c in trained}) == 3  # a new draw each epoch
    assert len(set().union(*trained)) > 4  # more of the pool than one draw is seen

    # The same trial from the command line: the same numbers (the draws are seeded), and its run
    # says what it replayed; the whole pool is disjoint from the retained-accuracy structures.
    cli = tmp_path / "cli"
    cli.mkdir()
    done, run = trial_cli(_overrides(tiny_data, embedded_paths, cli, *pool), cli)
    for name in result.metrics.keys() - TIMINGS:
        assert run.data.metrics[name] == pytest.approx(result.metrics[name], rel=1e-12), name
    assert run.data.params["finetune.replay.pool"] == "12"
    assert run.data.params["original.replay_structures"] == "12"
    assert run.info.run_name.endswith("replay4of12")
    assert "4 structures drawn each epoch from 12" in done.stdout
    mlflow.set_tracking_uri(f"sqlite:///{cli / 'mlflow.db'}")
    indices = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/original_indices.json"))
    assert len(indices["replay"]) == 12 and len(indices["retained"]) == 2
    assert not set(indices["replay"]) & set(indices["retained"])


def test_by_default_replay_takes_what_the_original_set_leaves_in_batches_of_two(
    tiny_data, embedded_paths, tmp_path
) -> None:
    """No replay key given: 16 original structures per epoch, drawn from a pool of up to 32 beside
    those that measure retention, in batches of 2; fewer where the file leaves fewer, none where
    retention takes it all."""
    cases = {  # name: (original file, structures that measure retention, more)
        "room": (embedded_paths["original"], 2, []),  # 160 structures: 16 a epoch, of 32
        "little": (tiny_data["original"], 2, []),  # 6 structures: the 4 left
        "none": (tiny_data["original"], 6, []),
        # labels in another unit measure retention (converted) but cannot train: no replay
        "units": (embedded_paths["original"], 2, ["data.original.energy_unit=meV"]),
    }
    found = {}
    for name, (original, retained, more) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        overrides = merged(
            tiny_overrides(tiny_data, folder),
            [f"data.original.path={original}", f"data.original.max_structures={retained}", "train.epochs=1"],
            more,
        )
        found[name] = trial_cli(overrides, folder)
    assert "no replay by default: finetune.replay.labels=reference" in found["units"][0].stderr
    assert "less replay by default: " in found["little"][0].stderr  # 4 where 16 of 32 were measured
    assert "4 structures beside the 2" in found["little"][0].stderr
    assert "less replay by default" not in found["room"][0].stderr
    expected = {"room": (16, 32, 8), "little": (4, None, 2), "none": (0, None, 0), "units": (0, None, 0)}
    for name, (replayed, pool, batches) in expected.items():
        done, run = found[name]
        assert run.data.params["finetune.replay.structures"] == str(replayed), name
        assert run.data.params["finetune.replay.pool"] == str(pool), name
        assert run.data.params["original.replay_structures"] == str(pool or replayed), name
        assert run.data.metrics["replay_batches_per_epoch"] == batches, name
        assert run.data.metrics["train_batches_per_epoch"] == 2, name  # 8 structures, batches of 4
        assert (f"replay: {replayed} structures" in done.stdout) == (replayed > 0), name
    assert "replay: 16 structures drawn each epoch from 32 of the original set" in found["room"][0].stdout
    assert found["room"][1].info.run_name.endswith("replay16of32")


def test_the_first_run_on_a_new_machine_replays_too(tiny_data, tmp_path, monkeypatch) -> None:
    """The embedded original set is made when a trial first needs it: on a machine where it does
    not exist yet, the default replay must make it before counting its structures, not see a
    missing file and replay nothing."""
    fresh = tmp_path / "new-cache"
    monkeypatch.setenv("PET_LORA_SWEEPER_CACHE", str(fresh))  # the user's cache, empty
    original = embedded.dataset_paths()["original"]
    assert not original.exists()
    overrides = [o for o in tiny_overrides(tiny_data, tmp_path) if not o.startswith("data.original.path")]
    done, run = trial_cli(merged(overrides, ["data.original.max_structures=2", "train.epochs=1"]), tmp_path)
    assert original.is_file()
    assert run.data.params["finetune.replay.structures"] == str(replay.AUTO)
    assert run.data.params["original.replay_structures"] == str(replay.AUTO_POOL)
    assert f"replay: {replay.AUTO} structures drawn each epoch from {replay.AUTO_POOL}" in done.stdout


def test_replayed_batches_have_their_own_size(tiny_data, embedded_paths, tmp_path) -> None:
    """`finetune.replay.batch_size`: 8 replayed structures are 4 batches an epoch in batches of 2,
    2 in batches of train.batch_size (null; 4 here); the fine-tuning data's stay 2 either way."""
    found = {}
    for size, batches in (("2", 4), ("null", 2)):
        folder = tmp_path / size
        folder.mkdir()
        extra = ("finetune.replay.structures=8", f"finetune.replay.batch_size={size}", "train.epochs=2")
        _, run = trial_cli(_overrides(tiny_data, embedded_paths, folder, *extra), folder)
        assert run.data.metrics["replay_batches_per_epoch"] == batches, size
        assert run.data.metrics["train_batches_per_epoch"] == 2, size
        found[size] = run
    assert found["2"].data.params["finetune.replay.batch_size"] == "2"
    fits = {size: run.data.metrics["val_force_mae_meV_per_A"] for size, run in found.items()}
    assert fits["2"] != fits["null"]  # the same structures, batched otherwise: trained otherwise


def test_without_a_pool_replay_trains_on_the_same_structures_as_before(
    tiny_data, embedded_paths, tmp_path, monkeypatch
) -> None:
    """A pool as large as one draw is the fixed replay set: same numbers as no pool at all."""
    results = []
    for name, extra in (("fixed", ()), ("pool", ("finetune.replay.pool=4",))):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        overrides = _overrides(tiny_data, embedded_paths, folder, "finetune.replay.structures=4", *extra)
        results.append(trial.run(compose_config(overrides), folder / "out"))
    fixed, pooled = results
    for name in fixed.metrics.keys() - TIMINGS:
        assert pooled.metrics[name] == fixed.metrics[name], name


def test_anchoring_pulls_the_lora_update_toward_the_base(tiny_data, embedded_paths, tmp_path) -> None:
    """From the command line: a strong L2-SP weight keeps the update scaling x B @ A small; the
    weight is a param and in the run name. (What it does to forgetting: docs, benchmarks.)"""
    found = {}
    for weight in ("0", "100"):
        folder = tmp_path / f"anchor{weight}"
        folder.mkdir()
        extra = ("lora.alpha=32", "train.lr=1e-2", f"finetune.anchor.weight={weight}")
        done, run = trial_cli(_overrides(tiny_data, embedded_paths, folder, *extra), folder)
        adapter_dir = _adapter_dir(done.stdout)
        found[weight] = (run, _update_norm(adapter_dir))
    (plain, plain_norm), (anchored, anchored_norm) = found["0"], found["100"]
    assert anchored.data.params["finetune.anchor.weight"] == "100.0"
    assert anchored.info.run_name.endswith("anchor100") and "anchor" not in plain.info.run_name
    assert 0 < anchored_norm < 0.5 * plain_norm


def test_anchoring_full_fine_tuning_keeps_the_weights_near_the_base(
    tiny_data, embedded_paths, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    base = mtt.load_checkpoint(embedded.base_model_path()).state_dict()
    distances = []
    for weight in (0.0, 1e3):
        overrides = _overrides(
            tiny_data,
            embedded_paths,
            tmp_path,
            "finetune=full",
            "train.epochs=2",
            f"finetune.anchor.weight={weight}",
        )
        result = trial.run(compose_config(overrides), tmp_path / f"out{weight}")
        trained = load_file(str(result.adapter_dir / adapter.WEIGHTS_FILE))
        distances.append(sum(float(((t - base[n]) ** 2).sum()) for n, t in trained.items() if n in base))
    plain, anchored = distances
    assert 0 < anchored < 0.5 * plain


@pytest.mark.parametrize(
    ("preset", "layers"),
    [
        ([], ("input_linear", "output_linear", "w_in", "w_out")),  # the default: attention + feed-forward
        (["lora=attention"], ("input_linear", "output_linear")),
    ],
    ids=["default", "attention"],
)
def test_lora_adapts_the_layers_its_preset_names(preset, layers, tiny_data, tmp_path) -> None:
    """The adapter holds LoRA weights on exactly the preset's layers; re-applied, it gives the
    trial's numbers."""
    done, run = trial_cli([*tiny_overrides(tiny_data, tmp_path), *preset], tmp_path)
    assert run.data.params["lora.target_modules"] == str(list(layers))
    adapter_dir = _adapter_dir(done.stdout)
    tensors = adapter.read_config(adapter_dir)["tensors"]
    adapted = {layer for layer in compose_config([]).lora.target_modules  # the default: every target
               if any(f".{layer}.lora_B" in name for name in tensors)}  # fmt: skip
    assert adapted == set(layers)
    model = adapter.apply(adapter_dir, embedded.base_model_path())
    labels = data.labels_of(compose_config([]).data.finetune)
    dataset, _ = mtt.read_dataset(tiny_data["validation"], labels)
    torch.set_num_threads(2)
    again = evaluate.errors(model, dataset, labels, torch.device("cpu"))
    assert again["force_mae_meV_per_A"] == pytest.approx(
        run.data.metrics["val_force_mae_meV_per_A"], rel=1e-12
    )


def test_a_sweep_searches_the_anchor_weight_and_the_replay_draw(tiny_data, embedded_paths, tmp_path) -> None:
    arguments = _overrides(
        tiny_data,
        embedded_paths,
        tmp_path,
        "train.epochs=1",
        "finetune.replay.pool=12",
        "finetune.anchor.weight=tag(log, interval(0.001, 1.0))",
        "finetune.replay.structures=4,8",
        "hydra.sweeper.n_trials=2",
        "hydra/sweeper/pruner=none",
    )
    done = run_cli(["-m", *arguments], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = sweep_study(tmp_path)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    children = {r.info.run_id: r for r in runs(tmp_path) if "trial_number" in r.data.tags}
    for t in complete:
        run = children[t.user_attrs["run_id"]]
        assert 0.001 <= t.params["finetune.anchor.weight"] <= 1.0
        assert float(run.data.params["finetune.anchor.weight"]) == t.params["finetune.anchor.weight"]
        assert run.data.params["finetune.replay.structures"] == str(t.params["finetune.replay.structures"])
        assert run.data.params["finetune.replay.pool"] == "12"
        assert run.data.params["lora.target_modules"].endswith("'w_in', 'w_out']")


@pytest.mark.parametrize("select", ["objective", "mae_prod"])
def test_the_kept_epoch_is_the_best_by_the_chosen_score(select, tiny_data, embedded_paths, tmp_path) -> None:
    """With replay the validation energy swings between epochs: `objective` keeps the epoch of
    the lowest validation force MAE, `mae_prod` (metatrain's) the lowest product of the MAEs."""
    # A run whose two scores pick different epochs (on this data: the attention layers alone).
    overrides = _overrides(
        tiny_data, embedded_paths, tmp_path, "finetune.replay.structures=4", "train.epochs=5",
        "train.early_stopping_patience=null", "train.lr=5e-3", f"train.select_epoch_by={select}",
        "lora.alpha=16", "finetune.replay.batch_size=null", "lora=attention",
    )  # fmt: skip
    _, run = trial_cli(overrides, tmp_path)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def history(name: str) -> list[float]:
        found = client.get_metric_history(run.info.run_id, f"epoch/{name}")
        return [m.value for m in sorted(found, key=lambda m: m.step)]

    forces, energies = history("val_force_mae_meV_per_A"), history("val_energy_mae_meV_per_atom")
    products = [f * e for f, e in zip(forces, energies, strict=True)]
    scores = forces if select == "objective" else products
    assert len(scores) == 5 and run.data.params["train.select_epoch_by"] == select
    assert run.data.metrics["best_epoch"] == min(range(5), key=scores.__getitem__)
    # Here the two scores pick different epochs, so this test tells them apart.
    assert min(range(5), key=forces.__getitem__) != min(range(5), key=products.__getitem__)
    assert run.data.metrics["val_force_mae_meV_per_A"] == pytest.approx(
        forces[int(run.data.metrics["best_epoch"])], rel=1e-3
    )  # the kept weights are that epoch's (our evaluation against metatrain's, in float32)
