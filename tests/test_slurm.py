"""The documented SLURM recipe (docs/workers.md), run as a user runs it: the test writes the recipe's
script from the page (sizes, hosts and paths changed, nothing else), submits it with `sbatch` to a one-node
cluster started for the session (tests/slurm_cluster.py), and reads the outcome from Optuna and
MLflow: two array tasks, each a controller, joining one PostgreSQL study and one `mlflow server`
with basic auth, the passwords in the environment only. Then `scancel` of one task mid-trial."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import psycopg2
import pytest
import sqlalchemy
from helpers import REPO, slurm_cluster
from helpers.postgres_server import ENVIRONMENT, Server
from helpers.studies import check_nothing_lost_or_duplicated, sweep_study
from helpers.sweeps import sweep_args
from helpers.tracking import serve_mlflow
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

# What the test changes in the recipe: (the page's text, the test's text).
RECIPE_SIZES = [
    ("--array=0-3", "--array=0-1"),
    (" --gres=gpu:4", ""),  # no GPU here: workers_per_gpu=2 then means one worker
    ("--cpus-per-task=32", "--cpus-per-task=1"),
    ("hydra.sweeper.n_trials=256", "hydra.sweeper.n_trials=4"),
    ("lora.rank=4,8,16,32", "lora.rank=2,4"),
]
RECIPE_STORAGE = "postgresql://sweeper@db-host/optuna"
RECIPE_TRACKING = "http://mlflow-host:5000"
RECIPE_VENV = "~/pet-lora-sweeper/.venv/bin/activate"
N_TRIALS = 4
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}  # fmt: skip


@pytest.fixture(scope="session")
def slurm() -> Iterator[slurm_cluster.Cluster]:
    try:
        with slurm_cluster.throwaway() as cluster:
            yield cluster
    except slurm_cluster.NoSlurm as missing:
        pytest.skip(str(missing))


def test_postgres_role_signs_in_with_pgpassword_alone(postgres: Server) -> None:
    """What the recipe relies on: a URL without password, and SQLAlchemy + libpq (Optuna's
    storage, our study lock) take the password from PGPASSWORD."""
    if os.environ.get(ENVIRONMENT):
        pytest.skip(f"${ENVIRONMENT}'s server may trust every role: the throwaway server asks for passwords")
    with database_of_own_role(postgres) as (url, password, _), pytest.MonkeyPatch.context() as patch:
        patch.delenv("PGPASSWORD", raising=False)
        with pytest.raises(sqlalchemy.exc.OperationalError, match="password"):
            _connect(url)
        patch.setenv("PGPASSWORD", "not-" + password)
        with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
            _connect(url)
        patch.setenv("PGPASSWORD", password)
        assert _connect(url) == make_url(url).username


def test_slurm_recipe_two_array_tasks_share_one_study(slurm, postgres, tiny_data, tmp_path, monkeypatch):
    with database_of_own_role(postgres) as (storage, pg_password, superuser_url):
        with mlflow_with_basic_auth(tmp_path / "mlflow", monkeypatch) as (tracking_uri, mlflow_password):
            workdir = tmp_path / "submit"
            script = recipe_script(tiny_data, workdir, storage, tracking_uri, "train.epochs=2")
            seen = ArgumentWatch([pg_password, mlflow_password])
            job = submit(slurm, workdir, script, pg_password)
            states = wait_for_tasks(slurm, job, workdir, timeout=600, watch=seen)

            assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}, job_outputs(workdir)
            assert not seen.leaks, f"a password in process arguments: {seen.leaks}"
            assert not files_holding(workdir, [pg_password, mlflow_password])
            study = sweep_study(superuser_url)
            client = MlflowClient(tracking_uri=tracking_uri)
            check_nothing_lost_or_duplicated(study, client, N_TRIALS)
            assert len(study.trials) == N_TRIALS and study.user_attrs["controllers"] == 2
            assert only_parent_run(client).info.status == "FINISHED"
            # Each task in its own sweep folder, with the folders of the trials it ran.
            ran = [{d.name for d in (workdir / "multirun" / f"pet-lora-{job}" / str(task)).iterdir()
                    if d.name.isdigit()} for task in (0, 1)]  # fmt: skip
            assert ran[0] and ran[1] and ran[0] | ran[1] == {str(t.number) for t in study.trials}


def test_scancel_of_one_array_task_mid_trial(slurm, postgres, tiny_data, tmp_path, monkeypatch):
    """SLURM sends the cancelled task SIGTERM, then SIGKILL after KillWait: its trial is re-queued
    and finished by the other task, the budget met, nothing left RUNNING. A short heartbeat
    interval bounds how long the other task may take to notice without any signal handling."""
    if slurm.cpus < 2:
        pytest.skip("two array tasks of one CPU each need two CPUs")
    with database_of_own_role(postgres) as (storage, pg_password, superuser_url):
        with mlflow_with_basic_auth(tmp_path / "mlflow", monkeypatch) as (tracking_uri, _):
            workdir = tmp_path / "submit"
            script = recipe_script(tiny_data, workdir, storage, tracking_uri, "train.epochs=8",
                                   "hydra.sweeper.heartbeat_interval=5")  # fmt: skip
            job = submit(slurm, workdir, script, pg_password)
            victim = wait_for_trial_mid_way(slurm, job, workdir, superuser_url)
            cancelled_at = time.time()
            slurm.run("scancel", f"{job}_{victim.task}")
            states = wait_for_tasks(slurm, job, workdir, timeout=600)

            survivor = 1 - victim.task
            assert states == {f"{job}_{victim.task}": "CANCELLED", f"{job}_{survivor}": "COMPLETED"}, (
                job_outputs(workdir)
            )
            assert not Path(f"/proc/{victim.pid}").exists()  # SLURM ended the controller
            study = sweep_study(superuser_url)
            client = MlflowClient(tracking_uri=tracking_uri)
            cut = study.trials[victim.number]
            assert cut.state.name == "FAIL", f"trial {victim.number} was not cut mid-way: {cut.state.name}"
            retries = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
            assert [t.state.name for t in retries] == ["COMPLETE"]
            assert retries[0].params == cut.params
            assert retries[0].user_attrs["worker"] != cut.user_attrs["worker"]
            sweep_dirs = workdir / "multirun" / f"pet-lora-{job}"
            assert (sweep_dirs / str(survivor) / str(retries[0].number)).is_dir()  # the other task ran it
            check_nothing_lost_or_duplicated(study, client, N_TRIALS)
            cut_run = client.get_run(cut.user_attrs["run_id"])
            assert cut_run.info.status in ("FAILED", "KILLED")
            assert only_parent_run(client).info.status == "FINISHED"
            # What ended the cut trial, and how long it took: the -rA summary shows it.
            print(
                f"trial {victim.number} of task {victim.task} cancelled mid-trial; its run ended "
                f"{cut_run.info.status} ({cut_run.data.tags.get('error')}); trial failed "
                f"{cut.datetime_complete.timestamp() - cancelled_at:.1f} s after scancel, retry "
                f"{retries[0].number} started {retries[0].datetime_start.timestamp() - cancelled_at:.1f} s "
                "after"
            )


# ---------------------------------------------------------------------- the recipe


def recipe() -> str:
    """The bash block of the SLURM recipe in docs/workers.md."""
    text = (REPO / "docs" / "workers.md").read_text()
    found = re.search(r"\*\*SLURM recipe\.\*\*.*?```bash\n(.*?)```", text, re.S)
    assert found, "docs/workers.md has no SLURM recipe (a ```bash block after **SLURM recipe.**)"
    return textwrap.dedent(found.group(1))


def recipe_script(tiny_data, workdir: Path, storage: str, tracking_uri: str, *extra: str) -> str:
    """The recipe's script with this machine's sizes, hosts and paths, the tiny data's overrides
    appended to its `python -m sweeper` command."""
    workdir.mkdir()
    script = recipe()
    replacements = [*RECIPE_SIZES, (RECIPE_STORAGE, storage), (RECIPE_TRACKING, tracking_uri),
                    (RECIPE_VENV, str(activate_script(workdir)))]  # fmt: skip
    for old, new in replacements:
        assert old in script, f"docs/workers.md: its SLURM recipe lacks {old!r}: update tests/test_slurm.py"
        script = script.replace(old, new)
    lines = script.rstrip("\n").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("python -m sweeper -m"))
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    command = shlex.split(" ".join(lines[start : end + 1]).replace("\\", ""))
    given = {token.split("=", 1)[0] for token in command}
    tiny = sweep_args(tiny_data, workdir, "threads=1", *extra)[1:]
    lines[end] += " \\\n    " + " ".join(shlex.quote(a) for a in tiny if a.split("=", 1)[0] not in given)
    return "\n".join(lines) + "\n"


def activate_script(workdir: Path) -> Path:
    """This interpreter's venv, which the recipe sources; outside a venv, a stand-in that puts this
    interpreter first on PATH."""
    venv = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and venv.exists():
        return venv
    stand_in = workdir / "activate"
    stand_in.write_text(f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH\n")
    return stand_in


def submit(cluster: slurm_cluster.Cluster, workdir: Path, script: str, pg_password: str) -> str:
    """`sbatch pet-lora.sh` from `workdir`, PGPASSWORD and MLflow's credentials in its environment."""
    assert not cluster.jobs(finished=False), "jobs of an earlier test still run"
    (workdir / "pet-lora.sh").write_text(script)
    submitted = cluster.run("sbatch", "pet-lora.sh", cwd=workdir, env={"PGPASSWORD": pg_password})
    found = re.fullmatch(r"Submitted batch job (\d+)\s*", submitted)
    assert found, submitted
    return found.group(1)


# ---------------------------------------------------------------------- waiting and watching


def wait_for_tasks(cluster, job: str, workdir: Path, timeout: float,
                   watch: Callable[[], None] | None = None) -> dict[str, str]:  # fmt: skip
    """Poll squeue (no accounting, so no sacct) until both array tasks have finished."""
    deadline, states = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        states = {i: s for i, s in cluster.jobs().items() if i.startswith(f"{job}_")}
        if watch is not None:
            watch()
        if len(states) == 2 and set(states.values()) <= FINISHED:
            return states
        time.sleep(1)
    raise AssertionError(f"job {job} not done after {timeout:.0f} s: {states}\n{job_outputs(workdir)}")


class Victim:
    def __init__(self, number: int, pid: int, task: int) -> None:
        self.number, self.pid, self.task = number, pid, task


def wait_for_trial_mid_way(cluster, job: str, workdir: Path, storage: str, timeout: float = 300) -> Victim:
    """A trial whose MLflow run is open and which has reported an epoch, while both tasks run; its
    controller (host:pid in the trial's `worker` attribute) tells which array task it belongs to."""
    deadline, study = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        states = {i: s for i, s in cluster.jobs().items() if i.startswith(f"{job}_")}
        assert not set(states.values()) & FINISHED, f"a task ended early: {states}\n{job_outputs(workdir)}"
        # Before it exists, opening it would create Optuna's tables as the superuser. Opened once:
        # each opening holds connections until collected, and a slow machine polls long enough
        # to run the server out of them ("too many clients").
        if study is None and _study_exists(storage):
            study = sweep_study(storage)
        if study is not None:
            for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if "run_id" in trial.user_attrs and trial.intermediate_values and len(states) == 2:
                    pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
                    if set(states.values()) == {"RUNNING"}:
                        return Victim(trial.number, pid, _array_task(pid))
        time.sleep(0.5)
    raise AssertionError(f"no trial reached its first epoch in {timeout:.0f} s\n{job_outputs(workdir)}")


def _study_exists(url: str) -> bool:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            found = connection.exec_driver_sql("SELECT 1 FROM studies WHERE study_name = 'pet-lora'")
            return found.first() is not None
    except sqlalchemy.exc.ProgrammingError:  # no table yet
        return False
    finally:
        engine.dispose()


def _array_task(pid: int) -> int:
    environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = [v for v in environment if v.startswith(b"SLURM_ARRAY_TASK_ID=")]
    assert found, f"process {pid} is not an array task"
    return int(found[0].split(b"=", 1)[1])


class ArgumentWatch:
    """Each call scans every process's arguments for the secrets."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = [s.encode() for s in secrets]
        self.leaks: list[str] = []

    def __call__(self) -> None:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                arguments = cmdline.read_bytes()
                if any(secret in arguments for secret in self.secrets):
                    self.leaks.append(arguments.replace(b"\0", b" ").decode(errors="replace")[:300])


def files_holding(folder: Path, secrets: list[str]) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()
            and any(s.encode() in path.read_bytes() for s in secrets)]  # fmt: skip


def job_outputs(workdir: Path, characters: int = 3000) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-characters:]}"
                     for path in sorted(workdir.glob("slurm-*.out")))  # fmt: skip


# ---------------------------------------------------------------------- services


@contextlib.contextmanager
def database_of_own_role(postgres: Server) -> Iterator[tuple[str, str, str]]:
    """A fresh database owned by a fresh role that signs in with a password. Yields the role's URL
    (no password in it), the password, and the superuser's URL for the test's own checks."""
    role, password = f"sweeper_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
    admin = psycopg2.connect(host=postgres.url.host, port=postgres.url.port or 5432, user=postgres.user,
                             password=postgres.url.password, dbname="postgres")  # fmt: skip
    admin.autocommit = True
    admin.cursor().execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,))
    try:
        with postgres.database("slurm") as superuser_url:
            url = make_url(superuser_url)
            admin.cursor().execute(f"ALTER DATABASE {url.database} OWNER TO {role}")
            as_role = url.set(username=role, password=None).render_as_string(hide_password=False)
            yield as_role, password, superuser_url
    finally:
        admin.cursor().execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()


def _connect(url: str) -> str:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            return connection.exec_driver_sql("SELECT current_user").scalar()
    finally:
        engine.dispose()


@contextlib.contextmanager
def mlflow_with_basic_auth(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """`mlflow server --app-name basic-auth`; its admin's credentials in this process's environment
    (MLFLOW_TRACKING_USERNAME/PASSWORD), which sbatch passes on. Yields its URL and the password."""
    folder.mkdir()
    password = secrets.token_urlsafe(16)
    config = folder / "basic_auth.ini"
    config.write_text(textwrap.dedent(f"""\
        [mlflow]
        default_permission = READ
        database_uri = sqlite:///{folder / "auth.db"}
        admin_username = admin
        admin_password = {password}
        authorization_function = mlflow.server.auth:authenticate_request_basic_auth
        """))  # fmt: skip
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(config))
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(16))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    options = ("--app-name", "basic-auth", "--artifacts-destination", str(folder / "artifacts"))
    with serve_mlflow(folder, *options) as url:
        yield url, password


def only_parent_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("pet-lora").experiment_id
    parents = [r for r in client.search_runs([experiment]) if r.data.tags.get("role") == "study"]
    assert len(parents) == 1, [p.info.run_name for p in parents]
    return parents[0]
