"""Shared fixtures: tiny slices of the embedded data, config composition, CLI runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import postgres_server
import pytest
from ase.io import read, write
from mlflow.tracking import MlflowClient
from postgres_server import free_port

from sweeper import config, embedded

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["outside_data"]  # data and base models that are not ours (tests/outside_data.py)

config.register()

# End-to-end tests (sweeps, workers, servers, clusters, many trials): `python -m pytest -m "not slow"`
# leaves them out while working (a few minutes on 2 cores); the whole suite is what CI runs.
SLOW_MODULES = {
    "test_experiments", "test_forgetting_control", "test_outside_data", "test_packaging",
    "test_postgres_server", "test_registry", "test_replay", "test_resilience", "test_scale_out",
    "test_slurm", "test_sweep", "test_workers",
}  # fmt: skip
SLOW_TESTS = {
    "test_promote_ranks_the_most_recent_study_unless_told_otherwise",
    "test_joining_a_study_with_other_data_is_refused_with_one_line",
    "test_no_password_in_any_param_tag_artifact_file_log_or_console",
    "test_shipped_base_model_reproduces_its_recorded_errors",
    "test_pretrain_recipe_writes_a_usable_checkpoint_and_card",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module.__name__ in SLOW_MODULES or getattr(item, "originalname", "") in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache for the whole session (embedded data, base errors)."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["PET_LORA_SWEEPER_CACHE"] = str(root)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    return root


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_the_tests() -> None:
    """The signal tests press Ctrl-C (SIGINT) as a user does. A shell that starts pytest in the
    background without job control (`cmd &` in a script) makes it and every process it starts
    ignore SIGINT; a sweep rightly leaves an ignored SIGINT ignored, so those tests would fail."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # children start with SIGINT's default


@pytest.fixture(scope="session")
def embedded_paths(cache_dir: Path) -> dict[str, Path]:
    return embedded.ensure_datasets()


@pytest.fixture(scope="session")
def tiny_data(embedded_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small slices of the embedded sets, so a trial takes seconds."""
    folder = tmp_path_factory.mktemp("tiny")
    sizes = {"train": 8, "validation": 4, "test": 4, "original": 6}
    paths = {}
    for role, count in sizes.items():
        paths[role] = folder / f"{role}.xyz"
        write(paths[role], read(embedded_paths[role], index=f":{count}"), format="extxyz")
    return paths


def tiny_overrides(tiny_data: dict[str, Path], workdir: Path) -> list[str]:
    return [
        f"data.finetune.train={tiny_data['train']}",
        f"data.finetune.validation={tiny_data['validation']}",
        f"data.finetune.test={tiny_data['test']}",
        f"data.original.path={tiny_data['original']}",
        "train.epochs=3",
        "train.batch_size=4",
        "lora.rank=4",
        "threads=2",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def merged(*groups: list[str] | str) -> list[str]:
    """Overrides, the last value of a key winning (Hydra refuses a key given twice)."""
    chosen: dict[str, str] = {}
    for group in groups:
        for override in [group] if isinstance(group, str) else group:
            chosen[override.split("=", 1)[0]] = override
    return list(chosen.values())


def compose_config(overrides: list[str]):
    return config.composed(overrides)


SWEEPER = [sys.executable, "-m", "sweeper"]


def run_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [*SWEEPER, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trial_cli(overrides: list[str], workdir: Path):
    """`python -m sweeper` in `workdir`, as a user runs it: it succeeds; (its output, its one run)."""
    done = run_cli(overrides, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs(workdir)
    return done, run


def sweep_cli(tiny_data: dict[str, Path], workdir: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`python -m sweeper -m` on tiny data, 2 epochs per trial."""
    base = [a for a in tiny_overrides(tiny_data, workdir) if not a.startswith("train.epochs")]
    return run_cli(["-m", *base, "train.epochs=2", "data.original.max_structures=4", *arguments], cwd=workdir)


def sweep_args(tiny_data: dict[str, Path], workdir: Path, *arguments: str) -> list[str]:
    """`-m` and the overrides of a sweep on tiny data: ranks 2 and 4, no pruning. An argument
    replaces the default of its key (e.g. `tracking.uri=http://...`)."""
    defaults = [*tiny_overrides(tiny_data, workdir), "data.original.max_structures=4",
                "hydra/sweeper/pruner=none", "lora.rank=2,4"]  # fmt: skip
    return ["-m", *merged(defaults, list(arguments))]


def check_nothing_lost_or_duplicated(study: optuna.Study, client: MlflowClient, n_trials: int) -> None:
    trials = study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n_trials
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    experiment = client.get_experiment_by_name("pet-lora").experiment_id
    found = client.search_runs([experiment], max_results=1000)
    assert not [r for r in found if r.info.status == "RUNNING"]
    children = [r for r in found if "trial_number" in r.data.tags]
    finished = [r for r in children if r.info.status == "FINISHED"]
    # One FINISHED run per complete trial, with that trial's parameters: none lost, none twice.
    assert sorted(int(r.data.tags["trial_number"]) for r in finished) == sorted(t.number for t in complete)
    by_number = {t.number: t for t in complete}
    for run in finished:
        trial = by_number[int(run.data.tags["trial_number"])]
        assert trial.user_attrs["run_id"] == run.info.run_id
        assert int(run.data.params["lora.rank"]) == trial.params["lora.rank"]
        assert run.data.tags["threads"] == run.data.params["threads"]


def runs(workdir: Path, experiment: str = "pet-lora") -> list:
    """All MLflow runs of the experiment in `workdir/mlflow.db` (empty if none)."""
    if not (workdir / "mlflow.db").exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id])


@contextlib.contextmanager
def serve_mlflow(
    workdir: Path, *options: str, store: str | None = None, port: int | None = None
) -> Iterator[str]:
    """A real `mlflow server` on loopback over `store` (default `workdir/mlflow.db`), on `port` (default
    a free one: a restarted server takes its port again); yields its URL."""
    port, store = port or free_port(), store or f"sqlite:///{workdir / 'mlflow.db'}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *options],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start in 120 s")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver"
)


def chromium(tmp_path: Path):
    """Headless Debian chromium through selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="session")
def postgres() -> Iterator[postgres_server.Server]:
    """A PostgreSQL server: the one $PET_LORA_SWEEPER_TEST_POSTGRES names, else a throwaway one for the
    session (tests/postgres_server.py); `postgres.database(prefix)` makes a fresh database on it."""
    try:
        with postgres_server.configured_or_throwaway() as server:
            yield server
    except postgres_server.NoPostgreSQL as missing:
        pytest.skip(str(missing))
