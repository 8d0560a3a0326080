"""Sweeps through the CLI: `python -m sweeper -m ...` on tiny data, read back from Optuna and MLflow."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.browser import chromium, needs_chromium
from helpers.postgres_server import free_port
from helpers.studies import sweep_study
from helpers.sweeps import sweep_cli
from helpers.tracking import mlflow_client, runs, serve_mlflow
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from selenium.webdriver.support.ui import WebDriverWait

from sweeper.search import grammar
from sweeper.search.grammar import SearchSpaceError

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.rank=4,8,16", CategoricalDistribution([4, 8, 16])),
        ("lora.rank=choice(2, 4)", CategoricalDistribution([2, 4])),
        ("lora.rank=range(2, 6)", IntDistribution(2, 6)),
        ("lora.rank=range(2, 10, 4)", IntDistribution(2, 10, step=4)),
        ("lora.alpha=interval(1.0, 8.0)", FloatDistribution(1.0, 8.0)),
        ("lora.rank=int(interval(2, 9))", IntDistribution(2, 9)),
        ("train.lr=tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
        ("lora.rank=tag(log, int(interval(2, 64)))", IntDistribution(2, 64, log=True)),
        ("lora.init=shuffle(zero, metatrain)", None),
    ],
)
def test_grammar_gives_the_official_distributions(override, expected) -> None:
    space, fixed = grammar.parse([override])
    (distribution,) = space.values()
    if expected is None:  # shuffle: categorical over the same choices, any order
        assert sorted(distribution.choices) == ["metatrain", "zero"]
    else:
        assert distribution == expected
    assert fixed == {}


def test_plain_values_fix_keys_and_command_line_replaces_config_entries() -> None:
    space, fixed = grammar.parse(["lora.rank=choice(2,4,8)", "train.epochs=3", "lora.rank=4,8"])
    assert space == {"lora.rank": CategoricalDistribution([4, 8])}
    assert fixed == {"train.epochs": "3"}


@pytest.mark.parametrize(
    "override",
    ["lora.alpha=interval(5, 1)", "train.lr=tag(log, interval(0, 1e-2))", "lora.rank=range(8, 2)"],
)
def test_search_space_mistakes_are_errors(override) -> None:
    with pytest.raises(SearchSpaceError, match=override.split("=")[0]):
        grammar.parse([override])


_sweep = sweep_cli


@pytest.fixture(scope="module")
def rank_sweep(tiny_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    done = _sweep(tiny_data, workdir, "lora.rank=2,4", "hydra.sweeper.n_trials=3")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def test_rank_sweep_stays_in_its_choices_and_hangs_under_one_parent(rank_sweep) -> None:
    workdir, done = rank_sweep
    study = sweep_study(workdir)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert {t.params["lora.rank"] for t in study.trials} <= {2, 4}
    all_runs = runs(workdir)
    (parent,) = [r for r in all_runs if r.data.tags.get("role") == "study"]
    children = [r for r in all_runs if r is not parent]
    assert len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [0, 1, 2]
    assert {r.data.params["lora.rank"] for r in children} <= {"2", "4"}
    assert all(r.info.run_name.startswith(f"t{r.data.tags['trial_number']} r") for r in children)
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    assert "retained_force_mae_ratio" in done.stdout  # the summary table
    client = mlflow_client(workdir)
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_results.yaml", "trials.csv", "plots"} <= top
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/plots.html", "plots/optimization_history.png", "plots/intermediate_values.png"} <= plots
    assert "3 trials" in parent.data.tags["mlflow.note.content"]
    # Exactly the feasible trials are registered, each as one version of one model.
    study = sweep_study(workdir)
    feasible = {t.user_attrs["run_id"] for t in study.trials if t.user_attrs["constraints"][0] <= 0}
    versions = client.search_model_versions()
    assert {v.run_id for v in versions} == feasible and len(versions) == len(feasible)


def test_results_file_names_the_best_feasible_trial(rank_sweep) -> None:
    workdir, _ = rank_sweep
    (results,) = workdir.glob("multirun/*/*/optimization_results.yaml")
    summary = yaml.safe_load(results.read_text())
    study = sweep_study(workdir)
    feasible = [t for t in study.trials if t.user_attrs["constraints"][0] <= 0]
    if feasible:
        best = min(feasible, key=lambda t: t.value)
        assert summary["best_value"] == pytest.approx(best.value)
        assert summary["best_params"] == best.params
    else:
        assert summary["best_value"] is None


def test_resume_runs_only_what_the_budget_has_left(rank_sweep, tiny_data) -> None:
    workdir, _ = rank_sweep
    done = _sweep(tiny_data, workdir, "lora.rank=2,4", "hydra.sweeper.n_trials=4")
    assert done.returncode == 0, done.stderr[-3000:]
    again = _sweep(tiny_data, workdir, "lora.rank=2,4", "hydra.sweeper.n_trials=4")
    assert again.returncode == 0, again.stderr[-3000:]
    study = sweep_study(workdir)
    assert len(study.trials) == 4
    # The resumed sampler is seeded anew (seed + controllers so far): no replay of the first draws.
    drawn = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(drawn)) == len(drawn)
    parents = [r for r in runs(workdir) if r.data.tags.get("role") == "study"]
    assert len(parents) == 1 and len(runs(workdir)) == 5
    assert study.user_attrs["controllers"] >= 2


def test_infeasible_trials_are_kept_and_marked(tiny_data, tmp_path) -> None:
    # A tolerance no trial can meet: every trial is infeasible, and still recorded.
    done = _sweep(
        tiny_data, tmp_path, "lora.rank=2", "hydra.sweeper.n_trials=2", "objective.retained_tolerance=0"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = sweep_study(tmp_path)
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    ratios = [t.user_attrs["metrics"]["retained_force_mae_ratio"] for t in study.trials]
    assert all(
        t.user_attrs["constraints"][0] == pytest.approx(r - 1)
        for t, r in zip(study.trials, ratios, strict=True)
    )
    assert "infeasible" in done.stdout or all(r <= 1 for r in ratios)
    client = mlflow_client(tmp_path)
    assert client.search_model_versions() == []  # infeasible trials are not registered
    assert all(
        r.data.tags.get("registered") == "false" for r in runs(tmp_path) if "trial_number" in r.data.tags
    )


def test_pareto_mode_writes_solutions(tiny_data, tmp_path) -> None:
    done = _sweep(tiny_data, tmp_path, "objective=pareto", "hydra.sweeper.n_trials=2", "lora.rank=2,4")
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = tmp_path.glob("multirun/*/*/optimization_results.yaml")
    summary = yaml.safe_load(results.read_text())
    assert summary["solutions"] and all(len(s["values"]) == 2 for s in summary["solutions"])
    assert len(sweep_study(tmp_path).directions) == 2
    # objective=pareto brings its own sampler, multi-objective TPE (conf/objective/pareto.yaml)
    (parent,) = [r for r in runs(tmp_path) if r.data.tags.get("role") == "study"]
    assert (
        parent.data.params["sampler"].startswith("TPESampler(")
        and "multivariate=True" in (parent.data.params["sampler"])
    )


def test_a_sampler_on_the_command_line_wins_over_the_pareto_default(tiny_data, tmp_path) -> None:
    done = _sweep(
        tiny_data, tmp_path, "objective=pareto", "hydra/sweeper/sampler=nsgaii", "hydra.sweeper.n_trials=1"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (parent,) = [r for r in runs(tmp_path) if r.data.tags.get("role") == "study"]
    assert parent.data.params["sampler"].startswith("NSGAIISampler(")


@pytest.mark.parametrize(
    ("argument", "key"),
    [("lora.alpha=interval(5,1)", "lora.alpha"), ("lora.rnak=2,4", "lora.rnak")],
)
def test_search_space_mistake_stops_before_any_trial(tiny_data, tmp_path, argument, key) -> None:
    done = _sweep(tiny_data, tmp_path, argument, "hydra.sweeper.n_trials=2")
    assert done.returncode != 0
    assert key in done.stderr
    assert runs(tmp_path) == []


@pytest.mark.parametrize("objective", ["objective=constrained", "objective=pareto"])
def test_a_trial_with_an_absurd_learning_rate_is_pruned(tiny_data, tmp_path, objective) -> None:
    """Optuna's median pruner; with two objectives, our own median rule (sweeper/search/pruning.py)."""
    pruning = [
        "lora.rank=2",
        "hydra.sweeper.pruner.n_startup_trials=2",
        "hydra.sweeper.pruner.n_warmup_steps=0",
        objective,
    ]
    first = _sweep(tiny_data, tmp_path, *pruning, "train.lr=1e-3", "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr[-3000:]
    # The same study, resumed with a learning rate that wrecks the model in one epoch.
    absurd = _sweep(tiny_data, tmp_path, *pruning, "train.lr=0.5", "hydra.sweeper.n_trials=3")
    assert absurd.returncode == 0, absurd.stderr[-3000:]
    study = sweep_study(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    (pruned,) = [r for r in runs(tmp_path) if r.data.tags.get("trial_number") == "2"]
    assert pruned.info.status == "KILLED" and pruned.data.tags["pruned"] == "true"
    assert pruned.data.tags["optuna_state"] == "pruned"
    client = mlflow_client(tmp_path)
    logged = {a.path for a in client.list_artifacts(pruned.info.run_id)}
    assert "adapter" not in logged and "config.yaml" in logged  # what it ran, not what it made
    assert "val_force_mae_meV_per_A" not in pruned.data.metrics  # no final evaluation
    assert pruned.info.run_id not in {v.run_id for v in client.search_model_versions()}
    assert pruned.data.metrics["epoch/val_force_mae_meV_per_A"] > 10 * max(
        t.values[0] for t in study.trials[:2]
    )


def suggest_weight_decay(cfg, trial) -> None:
    """A custom search space extender, as `hydra.sweeper.custom_search_space` names one."""
    trial.suggest_float("train.weight_decay", 1e-4, 1e-2, log=True)


def test_custom_search_space_adds_parameters(tiny_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # so the CLI finds this module
    done = _sweep(
        tiny_data,
        tmp_path,
        "lora.rank=2",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.custom_search_space=test_sweep.suggest_weight_decay",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = sweep_study(tmp_path).trials
    (child,) = [r for r in runs(tmp_path) if "trial_number" in r.data.tags]
    assert float(child.data.params["train.weight_decay"]) == pytest.approx(trial.params["train.weight_decay"])


def test_the_console_shows_one_line_per_trial_then_the_table_and_where_to_look(rank_sweep) -> None:
    _, done = rank_sweep
    lines = done.stdout.splitlines()
    assert lines[0].startswith("study pet-lora (") and "0 of 3 trials done" in lines[0]
    trial_lines = [line for line in lines if re.match(r"^trial +\d+  ", line)]
    assert [int(line.split()[1]) for line in trial_lines] == [0, 1, 2]
    for line in trial_lines:
        assert (
            "lora.rank=" in line
            and "val_force_mae_meV_per_A " in line
            and "retained_force_mae_ratio " in line
        )
        assert re.search(r"complete( infeasible)?  \d+ s$", line)
    header = lines.index(
        next(line for line in lines if line.startswith("trial ") and "rank" in line and "state" in line)
    )
    assert header == 1 + len(trial_lines) and len(lines[header + 1 : header + 4]) == 3
    for text in (
        "objective: minimise val_force_mae_meV_per_A",
        "workflowType=machine_learning",
        "python -m sweeper.promote --study pet-lora",
        "optuna trials --study-name pet-lora",
        "optuna-dashboard sqlite:///",
    ):
        assert text in done.stdout, text
    console = done.stdout + done.stderr
    assert "Epoch:" not in console and "[HYDRA]" not in console and "trial finished" not in console
    for noise in ("FutureWarning", "A new study created", "MLflow database tables"):  # library INFO/warnings
        assert noise not in console, noise
    workdir, _ = rank_sweep
    complete = [t for t in sweep_study(workdir).trials if t.state.name == "COMPLETE"]
    # The retained-error constraint reaches the sampler the Optuna 5 way (Trial.set_constraint).
    assert complete and all(len(t.constraints) == 1 for t in complete)
    assert "study pet-lora:" in done.stderr  # the progress bar, on stderr


@pytest.fixture
def mlflow_server(rank_sweep):
    """A real `mlflow server` on loopback over the finished sweep's store."""
    workdir, _ = rank_sweep
    with serve_mlflow(workdir) as url:
        yield url


@needs_chromium
def test_mlflow_ui_lists_the_study_and_its_trials(mlflow_server, rank_sweep, tmp_path) -> None:
    browser = chromium(tmp_path)
    try:
        browser.get(f"{mlflow_server}/#/experiments/1/runs")
        WebDriverWait(browser, 60).until(
            lambda b: "study pet-lora" in b.find_element("tag name", "body").text
        )
        # The children sit under their parent: expand its row, then every trial run shows.
        rows = browser.find_elements("css selector", "[role='row']")
        (parent_row,) = [row for row in rows if "study pet-lora" in row.text]
        parent_row.find_element("css selector", "button[data-component-id*='runnamecellrenderer']").click()
        WebDriverWait(browser, 30).until(
            lambda b: all(f"t{n} r" in b.find_element("tag name", "body").text for n in range(3))
        )
        shot = Path(os.environ.get("SCREENSHOT_DIR", tmp_path)) / "mlflow_sweep.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        browser.quit()


@needs_chromium
def test_the_printed_link_opens_the_runs_table_with_each_trials_datasets(mlflow_server, rank_sweep, tmp_path):
    _, done = rank_sweep
    (page,) = re.findall(r"http://127\.0\.0\.1:5000/(#/experiments/\S+)", done.stdout)
    browser = chromium(tmp_path)
    try:
        browser.get(f"{mlflow_server}/{page}")
        body = lambda b: b.find_element("tag name", "body").text  # noqa: E731
        WebDriverWait(browser, 60).until(lambda b: "study pet-lora" in body(b))
        assert "Token Usage" not in body(browser) and "Dataset" in body(browser)  # the runs table
        rows = browser.find_elements("css selector", "[role='row']")
        (parent_row,) = [row for row in rows if "study pet-lora" in row.text]
        parent_row.find_element("css selector", "button[data-component-id*='runnamecellrenderer']").click()
        trials = len([r for r in runs(rank_sweep[0]) if "trial_number" in r.data.tags])
        WebDriverWait(browser, 30).until(lambda b: body(b).count("finetune-train (") == trials)
    finally:
        browser.quit()


@needs_chromium
def test_optuna_dashboard_shows_the_finished_study(rank_sweep, tmp_path) -> None:
    workdir, _ = rank_sweep
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "optuna-dashboard"),  # the `dashboard` extra's command
            f"sqlite:///{workdir / 'pet-lora.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    browser = chromium(tmp_path)
    try:
        body = lambda b: b.find_element("tag name", "body").text  # noqa: E731
        for _ in range(60):
            try:
                browser.get(f"http://127.0.0.1:{port}/dashboard/studies/1/trials")
                break
            except Exception:
                time.sleep(0.5)
        WebDriverWait(browser, 60).until(lambda b: "pet-lora" in body(b) and "Trial 0" in body(b))
        numbers = {int(n) for n in re.findall(r"Trial (\d+)", body(browser))}
        assert numbers == {t.number for t in sweep_study(workdir).trials}
    finally:
        browser.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_trial_left_running_is_failed_and_retried_with_its_parameters(tiny_data, tmp_path) -> None:
    first = _sweep(tiny_data, tmp_path, "lora.rank=2,4", "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    # A controller killed mid-trial leaves the trial RUNNING in the storage.
    study = sweep_study(tmp_path)
    orphan = study.ask(
        {"lora.rank": CategoricalDistribution([2, 4]), "lora.alpha": FloatDistribution(1.0, 64.0, log=True)}
    )
    orphan_params = dict(orphan.params)
    again = _sweep(tiny_data, tmp_path, "lora.rank=2,4", "hydra.sweeper.n_trials=2")
    assert again.returncode == 0, again.stderr[-3000:]
    trials = sweep_study(tmp_path).trials
    assert trials[orphan.number].state.name == "FAIL"
    retried = [t for t in trials if t.number > orphan.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert {k: retried[0].params[k] for k in orphan_params} == orphan_params
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2
