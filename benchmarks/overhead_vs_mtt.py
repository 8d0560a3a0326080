"""Our in-process trial against `mtt train` on the same work.

Same base checkpoint, data, seed, thread count and hypers (`lora.init=metatrain`, so both
initialise LoRA the same way; mtt's options are generated from the hypers our trial
hands to metatrain). Prints seconds per epoch for both (mean interval between epoch rows,
so start-up is excluded from both), their ratio, and the relative difference of the
validation metrics at the last epoch.

    python benchmarks/overhead_vs_mtt.py --epochs 20 --threads 2
    python benchmarks/overhead_vs_mtt.py --device cuda --epochs 5 --threads 4   # on a GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweeper import config, embedded, train  # noqa: E402
from sweeper import metatrain as mtt  # noqa: E402

METRICS = [
    "val_energy_mae_meV_per_atom",
    "val_energy_rmse_meV_per_atom",
    "val_force_mae_meV_per_A",
    "val_force_rmse_meV_per_A",
]


def our_overrides(args: argparse.Namespace, workdir: Path) -> list[str]:
    return [
        "lora.init=metatrain",
        f"lora.rank={args.rank}",
        f"lora.alpha={args.alpha}",
        f"train.lr={args.lr}",
        f"train.epochs={args.epochs}",
        "train.early_stopping_patience=null",  # mtt has none: run every epoch
        "train.select_epoch_by=mae_prod",  # mtt's choice of the best epoch
        f"threads={args.threads}",
        f"seed={args.seed}",
        f"device={args.device}",
        "data.finetune.test=null",
        "data.original.path=null",  # mtt measures no retention: same work only
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def mtt_options(args: argparse.Namespace, workdir: Path) -> dict:
    from hydra import compose, initialize_config_dir

    config.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=our_overrides(args, workdir))
    paths = embedded.ensure_datasets()
    strategy = mtt.finetune_strategy(
        "lora", cfg.model.checkpoint, args.rank, args.alpha, list(cfg.lora.target_modules)
    )
    hypers = train.hypers(cfg, strategy, [mtt.Labels()])

    def dataset(path: Path) -> dict:
        return {
            "systems": {"read_from": str(path), "length_unit": "angstrom"},
            "targets": {
                "energy": {
                    "key": "energy",
                    "unit": "eV",
                    "forces": {"read_from": str(path), "key": "forces"},
                    "stress": False,
                    "virial": False,
                }
            },
        }

    return {
        "seed": args.seed,
        "device": args.device,
        "base_precision": 32,
        "architecture": {"name": "pet", "training": hypers},
        "training_set": dataset(paths["train"]),
        "validation_set": dataset(paths["validation"]),
        # A file, not a fraction: a fractional split makes mtt shuffle the training set
        # (np.random), which changes which structures each batch holds.
        "test_set": dataset(paths["test"]),
    }


def run_mtt(args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> dict:
    folder = workdir / "mtt"
    folder.mkdir()
    (folder / "options.yaml").write_text(yaml.safe_dump(mtt_options(args, workdir)))
    start = time.perf_counter()
    command = [sys.executable, "-m", "metatrain", "train", "options.yaml"]  # `mtt train`, beside this Python
    with (folder / "mtt.log").open("w") as log:  # a file, not a pipe: mtt logs a lot
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=log)
    # mtt's log has whole-second stamps; watch its CSV (a row per epoch) to the 10 ms.
    row_times: list[float] = []
    while process.poll() is None:
        table = next(folder.glob("outputs/*/*/train.csv"), None)
        if table is not None:
            rows = max(0, table.read_text().count("\n") - 2)  # minus keys and units
            row_times += [time.perf_counter()] * (rows - len(row_times))
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"mtt train failed:\n{(folder / 'mtt.log').read_text()[-3000:]}")
    rows = list(csv.reader(next(folder.glob("outputs/*/*/train.csv")).open()))
    keys, units, last = rows[0], rows[1], rows[-1]
    curve = [dict(zip(keys, row, strict=True)).get("validation forces MAE") for row in rows[2:]]
    named = dict(
        mtt.metric(key, unit, float(value)) for key, unit, value in zip(keys, units, last, strict=True)
    )
    return {
        "wall_seconds": wall,
        "seconds_per_epoch": (row_times[-1] - row_times[0]) / (len(row_times) - 1),
        "last_epoch": {name: named[name] for name in METRICS},
        "val_force_mae_curve": [float(value) for value in curve],
    }


def run_ours(args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> dict:
    folder = workdir / "ours"
    folder.mkdir()
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sweeper", *our_overrides(args, workdir)],
        cwd=folder, env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"python -m sweeper failed:\n{done.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pet-lora").experiment_id])

    def last(name: str) -> float:
        history = client.get_metric_history(run.info.run_id, f"epoch/{name}")
        return max(history, key=lambda m: m.step).value

    curve = client.get_metric_history(run.info.run_id, "epoch/val_force_mae_meV_per_A")
    return {
        "wall_seconds": wall,
        "seconds_per_epoch": run.data.metrics["seconds_per_epoch"],
        "last_epoch": {name: last(name) for name in METRICS},
        "val_force_mae_curve": [m.value for m in sorted(curve, key=lambda m: m.step)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: both runs on the same device")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="bench-mtt-") as tmp:
        workdir = Path(tmp)
        mtt = run_mtt(args, workdir, env)
        ours = run_ours(args, workdir, env)
    ratio = ours["seconds_per_epoch"] / mtt["seconds_per_epoch"]
    print(f"{'':28}{'mtt train':>12}{'ours':>12}")
    print(f"{'seconds per epoch':28}{mtt['seconds_per_epoch']:12.3f}{ours['seconds_per_epoch']:12.3f}")
    print(f"{'wall seconds (with start-up)':28}{mtt['wall_seconds']:12.1f}{ours['wall_seconds']:12.1f}")
    print(f"per-epoch time ratio ours / mtt: {ratio:.3f} (device {args.device})")
    print(f"validation metrics at the last epoch ({args.epochs} epochs, seed {args.seed}):")
    differences = {}
    for name in METRICS:
        a, b = mtt["last_epoch"][name], ours["last_epoch"][name]
        differences[name] = (b - a) / a
        print(f"  {name:32}{a:12.3f}{b:12.3f}   rel. diff {differences[name]:+.2%}")
    print(json.dumps({"ratio": ratio, "relative_differences": differences, "mtt": mtt, "ours": ours}))


if __name__ == "__main__":
    main()
