"""Forgetting control on the embedded default: LoRA, full and heads fine-tuning, with and without replay.

Each configuration is a small study of our sweeper (`python -m sweeper -m`, random search
over its own box, Pareto objective so every trial keeps both errors, no pruning, no early
stopping) at the same budget of training epochs. For every configuration the script
reports its best trial (lowest fine-tuning validation force MAE) and its Pareto front of
fine-tuning force error against retained force error, the seconds per epoch (and their
ratio to LoRA's, next to the ratio of atoms per epoch), and draws all trials in one plot.

    python benchmarks/forgetting.py                          # 6 configurations x 4 trials x 15 epochs
    python benchmarks/forgetting.py --trials 2 --epochs 3    # a quick look
    python benchmarks/forgetting.py --plot docs/images/forgetting_pareto.png

The target it reports against: a replay configuration with a retained force-MAE ratio at
most 1.5 and a fine-tuning validation force MAE within 15 % of the best configuration
without replay.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from sweeper import embedded

REPLAY = ["finetune.replay.structures=choice(32, 64, 96)", "finetune.replay.repeat=choice(1, 2)"]
LORA = [
    "lora.rank=choice(4, 8, 16)",
    "lora.alpha=tag(log, interval(4.0, 64.0))",
    "train.lr=tag(log, interval(3e-4, 3e-3))",
]
NOT_LORA = ["lora.rank=8", "lora.alpha=16"]  # fixed: conf/'s search space would sample them, unused
FULL = ["finetune=full", "train.lr=tag(log, interval(1e-4, 1e-3))", *NOT_LORA]
HEADS = ["finetune=heads", "train.lr=tag(log, interval(3e-4, 1e-2))", *NOT_LORA]
CONFIGURATIONS = {
    "LoRA": LORA,
    "LoRA + replay (reference)": [*LORA, *REPLAY],
    "LoRA + replay (base labels)": [*LORA, *REPLAY, "finetune.replay.labels=base"],
    "full": FULL,
    "full + replay (reference)": [*FULL, *REPLAY],
    "heads": HEADS,
}
FINETUNE_ATOMS = 80 * 12  # the embedded fine-tuning training set: 80 slabs of 12 atoms
ORIGINAL_ATOMS_PER_STRUCTURE = 32


@dataclass
class Trial:
    configuration: str
    val_energy: float
    val_force: float
    retained_energy_ratio: float
    retained_force_ratio: float
    seconds_per_epoch: float
    replayed: int  # structures replayed per epoch (structures x repeat)
    params: dict

    @property
    def replay(self) -> bool:
        return self.replayed > 0


def run_study(
    name: str, space: list[str], folder: Path, trials: int, epochs: int, threads: int
) -> list[Trial]:
    folder.mkdir(parents=True)
    arguments = [
        sys.executable,
        "-m",
        "sweeper",
        "-m",
        *space,
        f"hydra.sweeper.n_trials={trials}",
        f"train.epochs={epochs}",
        "train.early_stopping_patience=null",
        "objective=pareto",
        "hydra/sweeper/pruner=none",
        "hydra/sweeper/sampler=random",
        "registry.enabled=false",
        f"threads={threads}",
        f"tracking.uri=sqlite:///{folder}/mlflow.db",
    ]
    done = subprocess.run(arguments, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name}: the study failed\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name="pet-lora", storage=f"sqlite:///{folder}/pet-lora.db")
    found = []
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        m = trial.user_attrs["metrics"]
        found.append(
            Trial(
                name,
                m["val_energy_mae_meV_per_atom"],
                m["val_force_mae_meV_per_A"],
                m["retained_energy_mae_ratio"],
                m["retained_force_mae_ratio"],
                m.get("seconds_per_epoch", m["train_seconds"] / m["epochs_run"]),
                int(trial.params.get("finetune.replay.structures", 0))
                * int(trial.params.get("finetune.replay.repeat", 1)),
                trial.params,
            )
        )
    return found


def pareto(trials: list[Trial]) -> list[Trial]:
    """Trials no other trial beats on both fine-tuning and retained force error."""

    def dominated(trial: Trial) -> bool:
        mine = (trial.val_force, trial.retained_force_ratio)
        return any(
            other.val_force <= mine[0]
            and other.retained_force_ratio <= mine[1]
            and (other.val_force, other.retained_force_ratio) != mine
            for other in trials
        )

    return sorted((trial for trial in trials if not dominated(trial)), key=lambda trial: trial.val_force)


def report(results: dict[str, list[Trial]]) -> None:
    lora_seconds = sum(t.seconds_per_epoch for t in results["LoRA"]) / max(1, len(results["LoRA"]))
    header = (
        f"{'configuration':<28} {'val E':>7} {'val F':>7} {'ret E x':>8} {'ret F x':>8} {'s/epoch':>8}"
        f" {'vs LoRA':>8} {'atoms x':>8}  best trial's params"
    )
    print(header)
    for name, trials in results.items():
        if not trials:
            print(f"{name:<28} no complete trial")
            continue
        best = min(trials, key=lambda t: t.val_force)
        atoms = (FINETUNE_ATOMS + best.replayed * ORIGINAL_ATOMS_PER_STRUCTURE) / FINETUNE_ATOMS
        params = ", ".join(f"{key.split('.')[-1]}={_short(value)}" for key, value in best.params.items())
        print(
            f"{name:<28} {best.val_energy:>7.1f} {best.val_force:>7.1f} {best.retained_energy_ratio:>8.2f}"
            f" {best.retained_force_ratio:>8.2f} {best.seconds_per_epoch:>8.2f}"
            f" {best.seconds_per_epoch / lora_seconds:>8.2f} {atoms:>8.2f}  {params}"
        )
    print("\nPareto fronts (val F meV/Å, retained F ratio, retained E ratio[, replayed per epoch]):")
    for name, trials in results.items():
        front = ", ".join(
            f"({t.val_force:.1f}, {t.retained_force_ratio:.2f}, {t.retained_energy_ratio:.2f}"
            + (f", {t.replayed}" if t.replay else "")
            + ")"
            for t in pareto(trials)
        )
        print(f"  {name:<28} {front}")
    without = [t for trials in results.values() for t in trials if not t.replay]
    best_without = min(t.val_force for t in without)
    hits = [
        t
        for trials in results.values()
        for t in trials
        if t.replay and t.retained_force_ratio <= 1.5 and t.val_force <= 1.15 * best_without
    ]
    lowest = min(
        (t for trials in results.values() for t in trials if t.replay),
        key=lambda t: t.retained_force_ratio,
        default=None,
    )
    print(f"\nbest fine-tuning val force MAE without replay: {best_without:.1f} meV/Å")
    print(
        f"target (replay: retained F ratio <= 1.5 and val F <= {1.15 * best_without:.1f}): "
        + (f"met by {len(hits)} trial(s)" if hits else "not met")
    )
    if lowest is not None:
        print(
            f"lowest retained force ratio with replay: {lowest.retained_force_ratio:.2f} "
            f"(val F {lowest.val_force:.1f}, {lowest.configuration})"
        )
    best_ratio_without = min(t.retained_force_ratio for t in without)
    print(f"lowest retained force ratio without replay: {best_ratio_without:.2f}")


def plot(results: dict[str, list[Trial]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    for (name, trials), marker in zip(results.items(), "osD^vP", strict=False):
        if not trials:
            continue
        points = axes.scatter(
            [t.val_force for t in trials],
            [t.retained_force_ratio for t in trials],
            marker=marker,
            label=name,
            alpha=0.8,
        )
        front = pareto(trials)
        axes.plot(
            [t.val_force for t in front],
            [t.retained_force_ratio for t in front],
            color=points.get_facecolor()[0],
            alpha=0.6,
        )
    axes.axhline(1.5, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("fine-tuning validation force MAE (meV/Å)")
    axes.set_ylabel("retained force MAE / base model's")
    axes.set_title("Forgetting on the embedded default: every trial, Pareto fronts")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=4, help="trials per configuration")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per trial (no early stopping)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated configuration names")
    parser.add_argument("--plot", type=Path, help="write the Pareto plot here (PNG)")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(CONFIGURATIONS)
    with tempfile.TemporaryDirectory(prefix="bench-forgetting-") as folder:
        os.environ["PET_LORA_SWEEPER_CACHE"] = str(Path(folder) / "cache")  # base errors, replay labels
        embedded.ensure_datasets()
        print(
            f"{len(chosen)} configurations x {args.trials} trials x {args.epochs} epochs, embedded default, "
            f"{args.threads} threads"
        )
        results = {}
        for index, name in enumerate(chosen):
            start = time.perf_counter()
            results[name] = run_study(
                name, CONFIGURATIONS[name], Path(folder) / str(index), args.trials, args.epochs, args.threads
            )
            print(f"  {name}: {len(results[name])} trials in {time.perf_counter() - start:.0f} s", flush=True)
        print()
        report(results)
        if args.plot:
            plot(results, args.plot)


if __name__ == "__main__":
    main()
