"""Trials per hour with 1 and k asynchronous workers, on the embedded default.

Runs the same sweep (random sampler, fixed seed: the same trials in every run; no
pruning and no early stopping: every trial trains the same number of epochs; rank
fixed so every trial costs the same) once per worker count, each in a fresh folder,
and reports wall time, trials per hour and the throughput ratio against one worker.
On the CPU the cores are split between the workers (2 cores: 1 worker x 2 threads
against 2 workers x 1 thread). With GPUs, `--workers-per-gpu 1,2,4` compares workers
sharing each GPU and samples GPU utilisation with nvidia-smi.

    python benchmarks/worker_scaling.py --workers 1,2 --trials 6 --epochs 20 --repeats 2

A shared VM's speed drifts by 10-15 % over minutes: `--repeats` runs the worker counts
in turns (1, 2, 1, 2, ...) so drift hits both, and reports the median ratio.

The "epochs/s" columns say what the hardware gives: k concurrent workers over each
trial's seconds per epoch, against one worker's; the wall-time ratio can only lose to
it through the sweeper's own costs (start-up, scheduling, tails).
    python benchmarks/worker_scaling.py --workers-per-gpu 1,2,4 --trials 16   # on a GPU box

`--model metatrain` runs the same sweeps on a larger PET (metatrain's default sizes,
pretrained for `--pretrain-epochs` on the embedded data by `sweeper.pretrain`): bigger
matrices use threads and GPUs better, so workers gain less.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sweeper.search.workers import visible_gpus


def gpu_utilisation(stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(1.0):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True, text=True,
        ).stdout  # fmt: skip
        values = [float(v) for v in out.split()]
        if values:
            samples.append(statistics.mean(values))


def larger_model(folder: Path, epochs: int) -> Path:
    checkpoint = folder / "pet_metatrain_size.ckpt"
    command = [sys.executable, "-m", "sweeper.pretrain", "--size", "metatrain", "--epochs", str(epochs),
               "--threads", str(os.cpu_count()), "-o", str(checkpoint)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pretraining the larger PET failed:\n{done.stderr[-3000:]}")
    print(done.stdout.strip().splitlines()[-1])
    return checkpoint


def sweep(workdir: Path, overrides: list[str], args: argparse.Namespace) -> tuple[float, list[float]]:
    workdir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "sweeper", "-m", *overrides,
        f"hydra.sweeper.n_trials={args.trials}", "hydra/sweeper/sampler=random", "hydra/sweeper/pruner=none",
        f"train.epochs={args.epochs}", "train.early_stopping_patience=null", f"lora.rank={args.rank}",
        "finetune.replay.structures=0",  # the fine-tuning work alone, as the recorded rows ran
    ]  # fmt: skip
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=gpu_utilisation, args=(stop, samples), daemon=True)
    if shutil.which("nvidia-smi"):
        sampler.start()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    if done.returncode != 0:
        sys.exit(f"sweep failed in {workdir}:\n{done.stderr[-3000:]}")
    return wall, samples


def seconds_per_epoch(workdir: Path) -> float:
    """Mean training seconds per epoch of the sweep's trials (from their MLflow runs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("pet-lora").experiment_id])
    return statistics.mean(
        r.data.metrics["seconds_per_epoch"] for r in found if "trial_number" in r.data.tags
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,2", help="worker counts (hydra.sweeper.n_jobs)")
    parser.add_argument("--workers-per-gpu", help="instead: workers on each GPU, e.g. 1,2,4")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all worker counts, in turns")
    parser.add_argument("--model", choices=["embedded", "metatrain"], default="embedded")
    parser.add_argument("--pretrain-epochs", type=int, default=2, help="for --model metatrain")
    args = parser.parse_args()
    gpus = len(visible_gpus("auto"))  # what the sweep's workers are pinned to
    if args.workers_per_gpu:
        runs = {
            f"{k} per GPU": ([f"hydra.sweeper.workers_per_gpu={k}"], int(k) * gpus)
            for k in args.workers_per_gpu.split(",")
        }
    else:
        runs = {f"{k} worker(s)": ([f"hydra.sweeper.n_jobs={k}"], int(k)) for k in args.workers.split(",")}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        model = []
        if args.model == "metatrain":
            model = [f"model.checkpoint={larger_model(Path(tmp), args.pretrain_epochs)}"]
        runs = {name: ([*workers, *model], k) for name, (workers, k) in runs.items()}
        ratios = table(runs, args, Path(tmp))
    if args.repeats > 1:
        print("median trials/hour ratio: " + ", ".join(
            f"{name} {statistics.median(values):.2f}x ({' '.join(f'{v:.2f}' for v in values)})"
            for name, values in ratios.items()
        ))  # fmt: skip


Runs = dict[str, tuple[list[str], int]]  # name: (overrides, workers running at once)


def table(runs: Runs, args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """Each run's row, `--repeats` times in turns; returns each run's throughput ratios."""
    env_note = f"{os.cpu_count()} cores" + (", GPUs" if shutil.which("nvidia-smi") else "")
    print(f"{args.trials} trials x {args.epochs} epochs, rank {args.rank}, {args.model} PET ({env_note})")
    print(f"{'workers':>14}{'wall s':>8}{'trials/hour':>13}{'vs first':>10}"
          f"{'s/epoch':>9}{'epochs/s':>10}{'vs first':>10}{'GPU util %':>12}")  # fmt: skip
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        first = first_epochs = None
        for index, (name, (overrides, concurrent)) in enumerate(runs.items()):
            workdir = tmp / f"{repeat}-{index}"
            wall, samples = sweep(workdir, overrides, args)
            rate, epoch_seconds = args.trials / wall * 3600, seconds_per_epoch(workdir)
            epochs = concurrent / epoch_seconds
            first, first_epochs = first or rate, first_epochs or epochs
            ratios[name].append(rate / first)
            utilisation = f"{statistics.mean(samples):.0f}" if samples else "-"
            print(
                f"{name:>14}{wall:>8.0f}{rate:>13.1f}{rate / first:>9.2f}x{epoch_seconds:>9.2f}"
                f"{epochs:>10.2f}{epochs / first_epochs:>9.2f}x{utilisation:>12}",
                flush=True,
            )
    return ratios


if __name__ == "__main__":
    main()
