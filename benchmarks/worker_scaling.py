"""Trials per hour with 1 and k asynchronous workers, on the embedded default.

Runs the same sweep (random sampler, fixed seed: the same trials in every run; no
pruning and no early stopping: every trial trains the same number of epochs; rank
fixed so every trial costs the same) once per worker count, each in a fresh folder,
and reports wall time, trials per hour and the throughput ratio against one worker.
On the CPU the cores are split between the workers (2 cores: 1 worker x 2 threads
against 2 workers x 1 thread). With GPUs, `--workers-per-gpu 1,2,4` compares workers
sharing each GPU and samples GPU utilisation with nvidia-smi.

    python benchmarks/worker_scaling.py --workers 1,2 --trials 6 --epochs 20 --ceiling

`--ceiling` also measures what the machine itself allows, without the sweeper: two
plain `python -m sweeper` trials one after the other with all threads, against two at
once with one thread each (both with their imports).
    python benchmarks/worker_scaling.py --workers-per-gpu 1,2,4 --trials 16   # on a GPU box
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


def gpu_utilisation(stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(1.0):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True, text=True,
        ).stdout  # fmt: skip
        values = [float(v) for v in out.split()]
        if values:
            samples.append(statistics.mean(values))


def sweep(workdir: Path, workers: list[str], args: argparse.Namespace) -> tuple[float, list[float]]:
    workdir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "sweeper", "-m", *workers,
        f"hydra.sweeper.n_trials={args.trials}", "hydra/sweeper/sampler=random", "hydra/sweeper/pruner=none",
        f"train.epochs={args.epochs}", "train.early_stopping_patience=null", f"lora.rank={args.rank}",
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


def ceiling(args: argparse.Namespace, cores: int) -> float:
    """Throughput of two single-thread trials side by side over two sequential full-thread ones."""
    trial = [sys.executable, "-m", "sweeper", f"train.epochs={args.epochs}",
             "train.early_stopping_patience=null", f"lora.rank={args.rank}",
             "registry.enabled=false"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as tmp:
        uri = f"tracking.uri=sqlite:///{tmp}/mlflow.db"
        quiet = {"cwd": tmp, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run([*trial, uri, f"threads={cores}"], check=True, **quiet)  # warm caches, create the db
        start = time.perf_counter()
        for _ in range(2):
            env = dict(os.environ, OMP_NUM_THREADS=str(cores))
            subprocess.run([*trial, uri, f"threads={cores}"], check=True, env=env, **quiet)
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        pair = [subprocess.Popen([*trial, uri, "threads=1"], env=env, **quiet) for _ in range(2)]
        if any(process.wait() != 0 for process in pair):
            sys.exit("a ceiling trial failed")
        return sequential / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,2", help="worker counts (hydra.sweeper.n_jobs)")
    parser.add_argument("--workers-per-gpu", help="instead: workers on each GPU, e.g. 1,2,4")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--ceiling", action="store_true", help="also measure the machine's own 2-process ratio"
    )
    args = parser.parse_args()
    if args.workers_per_gpu:
        runs = {
            f"{k} per GPU": [f"hydra.sweeper.workers_per_gpu={k}"] for k in args.workers_per_gpu.split(",")
        }
    else:
        runs = {f"{k} worker(s)": [f"hydra.sweeper.n_jobs={k}"] for k in args.workers.split(",")}
    env_note = f"{os.cpu_count()} cores" + (", GPUs" if shutil.which("nvidia-smi") else "")
    print(f"{args.trials} trials x {args.epochs} epochs, rank {args.rank}, embedded default ({env_note})")
    print(f"{'workers':>14}{'wall s':>9}{'trials/hour':>13}{'vs first':>10}{'GPU util %':>12}")
    first = None
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        for index, (name, workers) in enumerate(runs.items()):
            wall, samples = sweep(Path(tmp) / str(index), workers, args)
            rate = args.trials / wall * 3600
            first = first or rate
            utilisation = f"{statistics.mean(samples):.0f}" if samples else "-"
            print(f"{name:>14}{wall:>9.0f}{rate:>13.1f}{rate / first:>10.2f}x{utilisation:>11}", flush=True)
    if args.ceiling:
        cores = os.cpu_count() or 1
        print(f"machine ceiling: 2 single-thread trials at once vs 2 {cores}-thread trials in turn: "
              f"{ceiling(args, cores):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
