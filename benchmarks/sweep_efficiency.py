"""Search strategies at an equal budget of training epochs, on the embedded default.

(a) Hydra's basic grid sweeper over a rank x alpha x lr grid, (b) random search,
(c) TPE and (d) TPE with median pruning, the last three through our sweeper. Every
trial is a real LoRA fine-tuning; the budget is the grid's total number of epochs.
Prints, per strategy, the best fine-tuning validation force MAE reached within the
budget and within half of it (with that trial's retained force-MAE ratio), the epochs
TPE with pruning needed to match the grid's best, and our sweeper's own overhead per
trial: the study's wall time minus training and evaluation, over the trials.

    python benchmarks/sweep_efficiency.py --epochs 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

METRIC, RETAINED = "val_force_mae_meV_per_A", "retained_force_mae_ratio"
# One box for every strategy: the grid's points are the (log) centres of its cells, so
# the grid covers the box as evenly as 18 points can and no strategy searches elsewhere.
GRID = {"lora.rank": "4,16", "lora.alpha": "4,16,64", "train.lr": "3e-4,1e-3,3e-3"}
SPACE = {
    "lora.rank": "choice(4,16)",
    "lora.alpha": "tag(log, interval(2.0, 128.0))",  # cells x4 wide around 4, 16, 64
    "train.lr": "tag(log, interval(1.7e-4, 5.5e-3))",  # cells x3.2 wide around 3e-4, 1e-3, 3e-3
}


def run(workdir: Path, arguments: list[str], env: dict[str, str]) -> float:
    workdir.mkdir(parents=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sweeper", "-m", *arguments], cwd=workdir, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"sweep failed in {workdir}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def trials(workdir: Path) -> tuple[list[dict], dict | None]:
    """Trials in the order they ran: epochs trained, metric, retained ratio; study overhead."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pet-lora").experiment_id
    found = client.search_runs([experiment], order_by=["start_time ASC"], max_results=1000)
    parents = [r for r in found if r.data.tags.get("role") == "study"]
    rows = []
    children = [r for r in found if r not in parents]
    for run in children:
        epochs = len(client.get_metric_history(run.info.run_id, f"epoch/{METRIC}"))
        metrics, pruned = run.data.metrics, run.data.tags.get("pruned") == "true"
        if pruned:  # a pruned run logs no timings: all of it counts as work (overhead underestimated)
            work = (run.info.end_time - run.info.start_time) / 1000
        else:
            work = metrics["train_seconds"] + metrics["evaluation_seconds"]
        rows.append(
            {
                "epochs": epochs,
                METRIC: metrics.get(METRIC),
                RETAINED: metrics.get(RETAINED),
                "work": work,
                "pruned": pruned,
            }
        )
    overhead = None
    if parents:
        wall = (parents[0].info.end_time - parents[0].info.start_time) / 1000
        gaps = sorted(
            (b.info.start_time - a.info.end_time) / 1000 for a, b in zip(children, children[1:], strict=False)
        )
        overhead = {
            "per_trial": (wall - sum(row["work"] for row in rows)) / len(rows),
            "median_gap_between_trials": gaps[len(gaps) // 2] if gaps else float("nan"),
        }
    return rows, overhead


def best_within(rows: list[dict], budget: float) -> dict | None:
    spent, best = 0, None
    for row in rows:
        spent += row["epochs"]
        if spent > budget:
            break
        if row[METRIC] is not None and (best is None or row[METRIC] < best[METRIC]):
            best = row
    return best


def epochs_to_reach(rows: list[dict], target: float) -> int | None:
    spent = 0
    for row in rows:
        spent += row["epochs"]
        if row[METRIC] is not None and row[METRIC] <= target:
            return spent
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial")
    parser.add_argument("--original-structures", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    common = [
        f"train.epochs={args.epochs}",
        f"threads={args.threads}",
        "train.early_stopping_patience=null",  # equal epochs per completed trial
        "finetune.replay.structures=0",  # the recorded comparison ran without replay
        f"data.original.max_structures={args.original_structures}",
        "data.finetune.test=null",
    ]
    grid_size = 1
    for values in GRID.values():
        grid_size *= len(values.split(","))
    budget = grid_size * args.epochs
    space = [f"{key}={value}" for key, value in SPACE.items()]  # replaces the default space
    tpe = ["hydra.sweeper.sampler.n_startup_trials=3"]
    median = ["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=3"]
    strategies = {
        "grid (Hydra basic sweeper)": ["hydra/sweeper=basic", "hydra.sweeper.params=null"]
        + [f"{key}={value}" for key, value in GRID.items()],
        "random": [*space, "hydra/sweeper/sampler=random", "hydra/sweeper/pruner=none"]
        + [f"hydra.sweeper.n_trials={grid_size}"],
        "TPE": [*space, *tpe, "hydra/sweeper/pruner=none", f"hydra.sweeper.n_trials={grid_size}"],
        "TPE + median pruning": [*space, *tpe, *median, "hydra.sweeper.pruner.n_warmup_steps=1"]
        + [f"hydra.sweeper.n_trials={2 * grid_size}"],
    }
    report = {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for index, (name, arguments) in enumerate(strategies.items()):
            workdir = Path(tmp) / str(index)
            wall = run(workdir, common + arguments, env)
            rows, overhead = trials(workdir)
            report[name] = {"wall_seconds": wall, "rows": rows, "overhead_per_trial": overhead}
            print(f"{name}: {len(rows)} trials in {wall:.0f} s", flush=True)
    print_table(report, budget, grid_size, args.epochs)
    print(json.dumps(report))


def print_table(report: dict, budget: int, grid_size: int, epochs: int) -> None:
    grid_best = best_within(report["grid (Hydra basic sweeper)"]["rows"], budget)
    print(f"budget: {budget} epochs ({grid_size} grid points x {epochs} epochs), embedded default")
    header = f"best {METRIC}"
    print(f"{'strategy':28}{'trials':>7}{'epochs':>7}{header:>32}{RETAINED:>26}{'at half budget':>16}")
    for name, result in report.items():
        rows = result["rows"]
        best, half = best_within(rows, budget), best_within(rows, budget / 2)
        half_value = half[METRIC] if half else float("nan")
        spent = sum(r["epochs"] for r in rows)
        print(
            f"{name:28}{len(rows):>7}{spent:>7}{best[METRIC]:>32.2f}{best[RETAINED]:>26.2f}{half_value:>16.2f}"
        )
    pruning = report["TPE + median pruning"]["rows"]
    needed = epochs_to_reach(pruning, grid_best[METRIC])
    share = (
        "never" if needed is None else f"after {needed} epochs, {needed / budget:.0%} of the grid's {budget}"
    )
    pruned = sum(r["pruned"] for r in pruning)
    print(f"TPE + pruning reached the grid's best ({grid_best[METRIC]:.2f}): {share}; {pruned} trials pruned")
    for name, result in report.items():
        overhead = result["overhead_per_trial"]
        if overhead is not None:
            work = sum(r["work"] for r in result["rows"]) / len(result["rows"])
            per_trial, gap = overhead["per_trial"], overhead["median_gap_between_trials"]
            print(
                f"sweeper overhead, {name}: {per_trial:.2f} s per trial with the study's set-up and plots "
                f"({per_trial / (work + per_trial):.1%} of a {work + per_trial:.0f} s trial), "
                f"{gap:.2f} s between trials"
            )


if __name__ == "__main__":
    main()
