"""Forgetting control, v2: which configuration fits the new data and keeps the old accuracy.

Every configuration is a preset (conf/experiment/forgetting/<row>.yaml) or the defaults, with
one replay (32 fixed structures in batches of 2, the defaults' before 16 of a pool of 32) given to
the methods measured without it,
run as a small study of our sweeper: `python -m sweeper -m experiment=forgetting/<row> <space>`.
All rows get the same number of trials, the same epochs (early stopping off, the epoch of the
best validation force error kept), the same seeded random sampler, the same pruning of hopeless
trials (the median rule from half the epochs on) and the same search space for the keys they
share (LoRA rows: rank, alpha, lr; full and heads: lr, each over its own method's range); the
Pareto objective keeps both errors of every trial. The two rows with the largest hypervolume
get a second seed.

    python benchmarks/forgetting.py --quick                   # 2 rows x 2 trials x 2 epochs: does it run?
    python benchmarks/forgetting.py --plot docs/images/forgetting_v2.png   # every row, 6 trials x 40 epochs
    python benchmarks/forgetting.py --only lora,default --trials 6 --no-second-seed

It prints (as Markdown, for docs/forgetting.md) the table at equal epochs (each row's best fit and
its most retentive feasible trial), the table at equal wall time (the fine-tuning error each row
reaches within the reference row's training time, from the per-epoch curves), each row's front
and hypervolume against one reference point, plain LoRA's curve (is it converged?), and the
target check of issue 18: a LoRA adapter with retained force and energy ratios <= 1, a fit no
worse than the best row without forgetting control, at most 1.5x that row's seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper import embedded

LORA_SPACE = [
    "lora.rank=choice(4, 8, 16)",
    "lora.alpha=tag(log, interval(4.0, 64.0))",
    "train.lr=tag(log, interval(3e-4, 3e-3))",
]
ATTENTION_SPACE = [*LORA_SPACE, "lora=attention"]  # the attention layers only (not the default)
NOT_LORA = ["lora.rank=8", "lora.alpha=16"]  # fixed: the default space would sample them, unused
FULL_SPACE = ["train.lr=tag(log, interval(1e-4, 1e-3))", *NOT_LORA]
HEADS_SPACE = ["train.lr=tag(log, interval(3e-4, 1e-2))", *NOT_LORA]
# One replay (docs/forgetting.md, "Small replayed batches"; the defaults' until they drew 16 of a
# pool of 32), given to the presets measured without it, so that every method is compared with it.
REPLAY = [
    "finetune.replay.structures=32",
    "finetune.replay.batch_size=2",
    "finetune.replay.pool=null",
    "finetune.replay.repeat=1",
]
REPLAY16 = ["finetune.replay.structures=16", *REPLAY[1:]]
ROWS = {  # name -> (preset or None for the defaults, the search space and fixed keys)
    "lora": ("forgetting/lora", LORA_SPACE),
    "lora_ffn": ("forgetting/lora_ffn", LORA_SPACE),
    "full": ("forgetting/full", FULL_SPACE),
    "heads": ("forgetting/heads", HEADS_SPACE),
    "lora_ffn_anchor": (
        "forgetting/lora_ffn_anchor",
        [*LORA_SPACE, "finetune.anchor.weight=tag(log, interval(1e-4, 1e-1))"],
    ),
    # the defaults: LoRA on attention and feed-forward layers, 16 replayed of a pool of 32
    "default": (None, LORA_SPACE),
    "lora_ffn+replay32": (None, [*LORA_SPACE, *REPLAY]),  # the defaults before, 32 fixed
    "lora+replay": (None, [*ATTENTION_SPACE, *REPLAY]),  # the same on the attention layers
    "lora+replay16": (None, [*ATTENTION_SPACE, *REPLAY16]),  # half of it
    "lora+replay_separate": (None, [*ATTENTION_SPACE, *REPLAY, "finetune.replay.head=separate"]),
    "full+replay": ("forgetting/full", [*FULL_SPACE, *REPLAY]),
}
UNCONTROLLED = ("lora", "lora_ffn", "full", "heads")  # no replay, no anchoring
REPLAYING = [row for row, (preset, space) in ROWS.items() if preset is None or REPLAY[0] in space]
QUICK = ("lora", "default")
VAL_F, RET_F, RET_E = "val_force_mae_meV_per_A", "retained_force_mae_ratio", "retained_energy_mae_ratio"


@dataclass
class Trial:
    row: str
    seed: int
    metrics: dict[str, float]
    params: dict
    curve: list[tuple[float, float]]  # (seconds since training began, val force MAE) per epoch

    @property
    def fit(self) -> float:
        return self.metrics[VAL_F]

    @property
    def kept(self) -> float:
        return self.metrics[RET_F]

    @property
    def seconds(self) -> float:
        return self.metrics["train_seconds"]


def command(row: str, trials: int, epochs: int, threads: int, seed: int, folder: Path) -> list[str]:
    preset, space = ROWS[row]
    return [
        *([f"experiment={preset}"] if preset else []),
        *space,
        f"hydra.sweeper.n_trials={trials}",
        f"train.epochs={epochs}",
        "train.early_stopping_patience=null",
        "train.select_epoch_by=objective",  # every row keeps the epoch of its best fit
        "objective=pareto",
        "hydra/sweeper/sampler=random",
        # Hopeless trials stop: from half the epochs on, one whose best fit so far is worse than
        # the median of its row's completed trials at that epoch (from the fourth trial on).
        # Earlier, or against two trials, it stopped the best trial of a row (replay's curves
        # swing, and the best learning rates start slowly).
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=3",
        f"hydra.sweeper.pruner.n_warmup_steps={epochs // 2}",
        "registry.enabled=false",
        f"seed={seed}",
        f"threads={threads}",
        f"tracking.uri=sqlite:///{folder}/mlflow.db",
    ]


@dataclass
class Study:
    """One row's study at one seed: its completed trials, how many were pruned, its minutes."""

    trials: list[Trial]
    pruned: int
    minutes: float


def run_row(row: str, trials: int, epochs: int, threads: int, seed: int, root: Path) -> Study:
    folder = root / f"{row}-seed{seed}"
    arguments = command(row, trials, epochs, threads, seed, folder)
    if not (folder / "pet-lora.db").exists():  # with --workdir, a row studied before is read again
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "sweeper", "-m", *arguments], cwd=folder, capture_output=True, text=True
        )
        if done.returncode != 0:
            sys.exit(f"{row}: the study failed\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name="pet-lora", storage=f"sqlite:///{folder}/pet-lora.db")
    ended = [t for t in study.trials if t.datetime_complete is not None]  # read again: the same minutes
    minutes = (
        max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended)
    ).total_seconds() / 60
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    found = []
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        history = client.get_metric_history(trial.user_attrs["run_id"], f"epoch/{VAL_F}")
        start = min((m.timestamp for m in history), default=0) - 1000 * trial.user_attrs["metrics"].get(
            "seconds_per_epoch", 0.0
        )
        curve = [((m.timestamp - start) / 1000, m.value) for m in sorted(history, key=lambda m: m.step)]
        found.append(Trial(row, seed, trial.user_attrs["metrics"], trial.params, curve))
    pruned = len(study.get_trials(states=(TrialState.PRUNED,)))
    print(
        f"  {row} (seed {seed}): {len(found)} complete, {pruned} pruned, {minutes:.0f} min: "
        f"python -m sweeper -m {' '.join(arguments[:-1])}",
        flush=True,
    )
    return Study(found, pruned, minutes)


def front(trials: list[Trial]) -> list[Trial]:
    """Trials no other trial beats on both fine-tuning and retained force error."""

    def dominated(t: Trial) -> bool:
        return any(o.fit <= t.fit and o.kept <= t.kept and (o.fit, o.kept) != (t.fit, t.kept) for o in trials)

    return sorted((t for t in trials if not dominated(t)), key=lambda t: t.fit)


def hypervolume(trials: list[Trial], reference: tuple[float, float]) -> float:
    """The area the front dominates below `reference` (val force MAE, retained force ratio)."""
    area, ceiling = 0.0, reference[1]
    for t in front(trials):  # ascending fit, so descending retained ratio
        if t.fit < reference[0] and t.kept < ceiling:
            area += (reference[0] - t.fit) * (ceiling - t.kept)
            ceiling = t.kept
    return area


def fit_within(trial: Trial, seconds: float) -> float | None:
    """The best validation force MAE the trial had reached `seconds` into its training."""
    reached = [value for at, value in trial.curve if at <= seconds]
    return min(reached) if reached else None


def report(results: dict[str, Study], epochs: int, reference: tuple[float, float]) -> None:
    rows = {row: study.trials for row, study in results.items() if study.trials}
    print(f"\n### At equal epochs ({epochs})\n")
    print(
        "| row | complete (pruned) | study min | best val F | its val E | its ret. F / E ratio | its s "
        "| most retentive: val F, ret. F / E | hypervolume | best's params |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, trials in rows.items():
        best, keeper = min(trials, key=lambda t: t.fit), min(trials, key=lambda t: t.kept)
        study, energy = results[row], best.metrics["val_energy_mae_meV_per_atom"]
        print(
            f"| {row} | {len(trials)} ({study.pruned}) | {study.minutes:.0f} | {best.fit:.1f} | "
            f"{energy:.1f} | "
            f"{best.kept:.2f} / {best.metrics[RET_E]:.2f} | {best.seconds:.0f} | "
            f"{keeper.fit:.1f}, {keeper.kept:.2f} / {keeper.metrics[RET_E]:.2f} | "
            f"{hypervolume(trials, reference):.1f} | {_params(best)} |"
        )
    uncontrolled = [t for row in UNCONTROLLED for t in rows.get(row, [])]
    if not uncontrolled:
        return
    baseline = min(uncontrolled, key=lambda t: t.fit)
    budget = baseline.seconds
    print(f"\n### At equal wall time ({budget:.0f} s: the training time of the best row without control, "
          f"{baseline.row})\n")  # fmt: skip
    print("| row | best val F reached within it | epochs reached |\n|---|---|---|")
    for row, trials in rows.items():
        reached = [(fit_within(t, budget), sum(at <= budget for at, _ in t.curve)) for t in trials]
        reached = [r for r in reached if r[0] is not None]
        value, count = min(reached) if reached else (None, 0)
        print(f"| {row} | {'no epoch in time' if value is None else f'{value:.1f}'} | {count} |")
    print(f"\n### Fronts (val F meV/Å, retained F ratio); hypervolume reference {reference}\n")
    for row, trials in rows.items():
        print(f"- {row}: " + ", ".join(f"({t.fit:.1f}, {t.kept:.2f})" for t in front(trials)))
    if "lora" in rows:
        curve = min(rows["lora"], key=lambda t: t.fit).curve
        marks = sorted({max(0, len(curve) * q // 4 - 1) for q in (1, 2, 3, 4)})
        print("\nplain LoRA's best trial, val F by epoch: "
              + ", ".join(f"{i + 1}: {curve[i][1]:.1f}" for i in marks))  # fmt: skip
    hits = [
        t for row, trials in rows.items() if row.startswith(("lora", "default")) for t in trials
        if t.kept <= 1.0 and t.metrics[RET_E] <= 1.0 and t.fit <= baseline.fit and t.seconds <= 1.5 * budget
    ]  # fmt: skip
    print(
        f"\ntarget (LoRA, retained F and E ratios <= 1, val F <= {baseline.fit:.1f} ({baseline.row}), "
        f"<= {1.5 * budget:.0f} s): " + (f"met by {len(hits)} trial(s)" if hits else "not met")
    )
    keepers = [t for row, ts in rows.items() if not row.startswith("full") for t in ts if t.kept <= 1.0]
    closest = min(keepers, key=lambda t: t.fit, default=None)
    if closest is not None:
        print(f"closest with retained F ratio <= 1: {closest.row}, val F {closest.fit:.1f}, "
              f"retained E ratio {closest.metrics[RET_E]:.2f}, {closest.seconds:.0f} s")  # fmt: skip


def _params(trial: Trial) -> str:
    return ", ".join(
        f"{key.split('.')[-1]} {value:.3g}" if isinstance(value, float) else f"{key.split('.')[-1]} {value}"
        for key, value in trial.params.items()
    )


def plot(results: dict[str, Study], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (fronts, curves) = plt.subplots(1, 2, figsize=(14, 6))
    first_seed = min((t.seed for s in results.values() for t in s.trials), default=0)
    palette = plt.get_cmap("tab20").colors
    style = dict(zip(ROWS, zip(palette[::2] + palette[1::2], "osD^vP*Xh<>p", strict=False), strict=False))
    for row, study in results.items():
        if not study.trials:
            continue
        again = study.trials[0].seed != first_seed  # a second seed: its row's colour, hollow
        colour, marker = style[study.trials[0].row]
        fit, kept = [t.fit for t in study.trials], [t.kept for t in study.trials]
        fill = {"facecolors": "none", "edgecolors": colour} if again else {"color": colour}
        fronts.scatter(fit, kept, marker=marker, label=row, alpha=0.8, **fill)
        line = front(study.trials)
        fronts.plot([t.fit for t in line], [t.kept for t in line], color=colour, alpha=0.6,
                    linestyle="--" if again else "-")  # fmt: skip
        best = min(study.trials, key=lambda t: t.fit)
        curves.plot([at for at, _ in best.curve], [v for _, v in best.curve], color=colour, label=row,
                    linestyle="--" if again else "-")  # fmt: skip
    fronts.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    fronts.set(xlabel="fine-tuning validation force MAE (meV/Å)", ylabel="retained force MAE / base's",
               title="every trial; each row's Pareto front")  # fmt: skip
    curves.set(
        xlabel="training seconds", ylabel="validation force MAE (meV/Å)", title="each row's best trial"
    )
    fronts.legend(fontsize=8)
    curves.set_ylim(top=80)  # the first epochs' errors would flatten the rest
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=6, help="trials per row and seed")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per trial (no early stopping)")
    parser.add_argument("--parallel", type=int, default=2, help="studies at once (threads: cores / parallel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated rows: " + ", ".join(ROWS))
    parser.add_argument("--reference", default="60,3", help="hypervolume reference: val F, retained F ratio")
    parser.add_argument("--plot", type=Path, help="write the fronts and curves here (PNG)")
    parser.add_argument(
        "--second-seed", action=argparse.BooleanOptionalAction, default=True, help="the two best rows again"
    )
    parser.add_argument("--quick", action="store_true", help="rows lora, lora_replay; 2 trials x 2 epochs")
    parser.add_argument(
        "--workdir", type=Path, help="keep the studies here; a row already there is read, not run again"
    )
    args = parser.parse_args()
    if args.quick:  # far from converged: a reference that 2-epoch fronts reach
        args.trials, args.epochs, args.only = 2, 2, args.only or ",".join(QUICK)
        args.reference = "150,20" if args.reference == parser.get_default("reference") else args.reference
    rows = args.only.split(",") if args.only else list(ROWS)
    if unknown := set(rows) - set(ROWS):
        sys.exit(f"--only: unknown rows {sorted(unknown)}; rows: {', '.join(ROWS)}")
    reference = tuple(float(x) for x in args.reference.split(","))
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    print(f"{len(rows)} rows x {args.trials} trials x {args.epochs} epochs, {args.parallel} studies at once "
          f"of {threads} threads, seed {args.seed}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-forgetting-") as scratch:
        folder = str(args.workdir or scratch)
        os.environ["PET_LORA_SWEEPER_CACHE"] = str(Path(folder) / "cache")  # base errors, replay labels
        embedded.ensure_datasets()

        def run(row: str, seed: int) -> Study:
            return run_row(row, args.trials, args.epochs, threads, seed, Path(folder))

        began = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            # The replay rows, the longest, first: the studies then end close together.
            started = {
                row: pool.submit(run, row, args.seed)
                for row in sorted(rows, key=lambda r: r not in REPLAYING)
            }
            results = {row: started[row].result() for row in rows}
            if args.second_seed and not args.quick and len(rows) > 2:  # the two best rows: a second seed
                best = sorted(rows, key=lambda row: -hypervolume(results[row].trials, reference))[:2]
                again = pool.map(lambda row: run(row, args.seed + 1), best)
                for row, study in zip(best, again, strict=True):
                    results[f"{row} (seed {args.seed + 1})"] = study
        print(f"\nthe benchmark took {(time.perf_counter() - began) / 60:.0f} minutes")
        report(results, args.epochs, reference)
        if args.plot:
            plot(results, args.plot)


if __name__ == "__main__":
    main()
