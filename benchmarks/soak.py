"""Soak: a long sweep on the multi-machine path under a seeded schedule of faults.

    python benchmarks/soak.py --trials 60 --seed 0      # the acceptance run
    python benchmarks/soak.py --quick                   # a smoke run of ~3 minutes

It starts a throwaway PostgreSQL server (tests/helpers/postgres_server.py), a role that must give its
password, a real `mlflow server` on PostgreSQL and 2 controllers of 2 workers each on tiny data
(1 epoch per trial), all on 127.0.0.1. Faults, drawn from `--seed` and overlapping at random:
SIGKILL and SIGTERM of a worker or a whole controller (restarted after a delay with the same
command, as a cluster would), PostgreSQL stopped for a few seconds, the MLflow server stopped and
restarted. A controller that exits with an error is restarted too (counted apart). It stops by
itself: once the controllers are done, or after `--minutes`.

Invariants checked at the end, one line each: the study's COMPLETE trials equal the budget; no trial
number completed twice; each COMPLETE trial has exactly one FINISHED run with its metrics and its
adapter, and each registered version points to a FINISHED run whose adapter sha256 matches its tag;
nothing RUNNING in Optuna or MLflow (WAITING retries that the budget outran are listed); none of
the processes it started (and their children) is left; no file it wrote holds the password. Exit
status 1 when one fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import mlflow.artifacts
import optuna
import psutil
from ase.io import read, write
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # as pytest does: the tests' helpers are `helpers.*`
from helpers import postgres_server  # noqa: E402

from sweeper import adapter, embedded  # noqa: E402

PASSWORD = "soak-pw-7f3a9c1e"  # the role's; a file that holds it leaked it
ROLE = "soak"


class Cluster:
    """The processes of the soak: PostgreSQL, the MLflow server, the controllers."""

    def __init__(self, workdir: Path, server: postgres_server.Server, trials: int, epochs: int) -> None:
        self.workdir, self.server = workdir, server
        self.seen: dict[int, float] = {}  # every process started (and its children): pid -> start time
        self.lock = threading.Lock()
        self.mlflow_port = postgres_server.free_port()
        self.mlflow: subprocess.Popen | None = None
        self.storage = f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{server.url.port}/optuna"
        self.command = [sys.executable, "-m", "sweeper", "-m", *tiny_overrides(workdir, epochs),
                        f"hydra.sweeper.n_trials={trials}", "hydra.sweeper.n_jobs=2", "threads=1",
                        "hydra/sweeper/pruner=none", "hydra.sweeper.heartbeat_interval=5",
                        "hydra.sweeper.max_retries=10", "lora.rank=2,4,8",
                        "train.lr=tag(log, interval(1e-4, 1e-2))",
                        f"hydra.sweeper.storage={self.storage}", f"tracking.uri={self.tracking}"]  # fmt: skip
        self.controllers: list[subprocess.Popen | None] = [None, None]

    @property
    def tracking(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def remember(self, pid: int) -> None:
        with self.lock, contextlib.suppress(psutil.NoSuchProcess):
            self.seen[pid] = psutil.Process(pid).create_time()

    def watch(self) -> None:
        """Record the children of every process started (workers, the server's workers)."""
        for pid in list(self.seen):
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(pid).children(recursive=True):
                    self.remember(child.pid)

    def start_mlflow(self) -> None:
        store = f"postgresql://{ROLE}@127.0.0.1:{self.server.url.port}/mlflow"  # password from PGPASSWORD
        env = dict(os.environ, PGPASSWORD=PASSWORD)
        self.mlflow = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1",
             "--port", str(self.mlflow_port), "--workers", "1",
             "--artifacts-destination", str(self.workdir / "artifacts")],
            cwd=self.workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.remember(self.mlflow.pid)
        for _ in range(240):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.tracking}/health", timeout=1).close()
                return
            time.sleep(0.5)
        raise RuntimeError("mlflow server did not start in 120 s")

    def stop_mlflow(self) -> None:
        if self.mlflow is not None and self.mlflow.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.mlflow.pid, signal.SIGTERM)
            try:
                self.mlflow.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a loaded machine: a stop is what the fault asks for
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.mlflow.pid, signal.SIGKILL)
                self.mlflow.wait()

    def start_controller(self, index: int) -> None:
        folder = self.workdir / f"machine-{index}"
        folder.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(folder / "out.log", "a") as out, open(folder / "err.log", "a") as err:
            process = subprocess.Popen(self.command, cwd=folder, env=env, stdout=out, stderr=err)
        self.controllers[index] = process
        self.remember(process.pid)

    def workers(self) -> list[psutil.Process]:
        found = []
        for controller in self.controllers:
            if controller is not None and controller.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    found += [
                        p
                        for p in psutil.Process(controller.pid).children()
                        if "spawn" in " ".join(p.cmdline())
                    ]
        return found

    def left_running(self, patience: float = 60) -> list[int]:
        """The processes started that still run after `patience` seconds (MLflow's job consumers take
        ~10 s to go after a SIGTERM)."""
        deadline = time.monotonic() + patience
        while (alive := self._alive()) and time.monotonic() < deadline:
            time.sleep(1)
        return alive

    def _alive(self) -> list[int]:
        alive = []
        for pid, started in self.seen.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive


def tiny_overrides(workdir: Path, epochs: int) -> list[str]:
    """Slices of the embedded sets, as tests/conftest.py's `tiny_data` makes them."""
    paths = embedded.ensure_datasets()
    sizes = {"train": 8, "validation": 4, "test": 4, "original": 6}
    for role, count in sizes.items():
        write(workdir / f"{role}.xyz", read(paths[role], index=f":{count}"), format="extxyz")
    return [f"data.finetune.train={workdir / 'train.xyz'}",
            f"data.finetune.validation={workdir / 'validation.xyz'}",
            f"data.finetune.test={workdir / 'test.xyz'}", f"data.original.path={workdir / 'original.xyz'}",
            "data.original.max_structures=4", f"train.epochs={epochs}", "train.batch_size=4",
            "finetune.replay.structures=0"]  # fmt: skip


class Faults:
    """The seeded fault schedule; each fault runs in its own thread, so faults overlap."""

    def __init__(self, cluster: Cluster, postgres: PostgresControl, seed: int) -> None:
        self.cluster, self.postgres, self.random = cluster, postgres, random.Random(seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.recoveries: collections.Counter[str] = collections.Counter()
        self.threads: list[threading.Thread] = []
        self.restarting: set[int] = set()
        self.outages: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def inject(self) -> None:
        kind = self.random.choice(["kill", "kill", "term", "term", "postgres", "mlflow"])
        delay = self.random.uniform(2, 8)
        if kind in ("kill", "term"):
            signum = signal.SIGKILL if kind == "kill" else signal.SIGTERM
            if self.random.random() < 0.3:
                index = self.random.randrange(2)
                if index in self.restarting or self.cluster.controllers[index].poll() is not None:
                    return
                self.restarting.add(index)
                self.cluster.controllers[index].send_signal(signum)
                self._later(delay, self._restart_controller, index)
            else:
                workers = self.cluster.workers()
                if not workers:
                    return
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.random.choice(workers).send_signal(signum)
        else:  # an outage: overlapping ones nest, the service comes back when the last one ends
            self._outage(kind, self.postgres.stop if kind == "postgres" else self.cluster.stop_mlflow)
            self._later(delay, self._outage_ends, kind)
        self.counts[kind] += 1

    def _later(self, delay: float, action, *args) -> None:
        def run() -> None:
            time.sleep(delay)
            action(*args)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def _outage(self, kind: str, stop) -> None:
        with self.lock:
            self.outages[kind] += 1
            if self.outages[kind] == 1:
                stop()

    def _outage_ends(self, kind: str) -> None:
        with self.lock:
            self.outages[kind] -= 1
            if self.outages[kind] == 0:
                (self.postgres.start if kind == "postgres" else self.cluster.start_mlflow)()
                self.recoveries[f"{kind} back"] += 1

    def _restart_controller(self, index: int) -> None:
        self.cluster.controllers[index].wait()
        self.cluster.start_controller(index)
        self.restarting.discard(index)
        self.recoveries["controller restarted"] += 1

    def settle(self) -> None:
        for thread in self.threads:
            thread.join()


class PostgresControl:
    """Stops and starts the throwaway server (its folder: the one this process owns)."""

    def __init__(self, server: postgres_server.Server) -> None:
        self.pg_ctl = postgres_server.find_pg_ctl()
        (self.folder,) = [
            record.parent
            for record in Path(tempfile.gettempdir()).glob(f"{postgres_server.FOLDER_PREFIX}*/session.json")
            if f'"pid": {os.getpid()},' in record.read_text()
        ]
        self.port = server.url.port
        self.lock = threading.Lock()

    def _ctl(self, *arguments: str) -> None:
        command = [str(self.pg_ctl), *arguments, "-s", "-w", "-D", str(self.folder / "data")]
        postgres_server._run(command, self.folder, postgres_server._as_owner_of(self.folder))

    def stop(self) -> None:
        with self.lock:
            self._ctl("stop", "-m", "fast")

    def start(self) -> None:
        options = f"-F -p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder}"
        with self.lock:
            self._ctl("start", "-t", "60", "-l", str(self.folder / "server.log"), "-o", options)


def run_soak(cluster: Cluster, faults: Faults, deadline: float, mean_gap: float) -> None:
    for index in range(2):
        cluster.start_controller(index)
    next_fault = time.monotonic() + 20  # the first trials start before the first fault
    while time.monotonic() < deadline:
        time.sleep(0.5)
        cluster.watch()
        idle = [
            i
            for i, c in enumerate(cluster.controllers)
            if c.poll() is not None and i not in faults.restarting
        ]
        if len(idle) == 2 and all(cluster.controllers[i].returncode == 0 for i in idle):
            if not faults.threads or all(not t.is_alive() for t in faults.threads):
                return
        for index in idle:
            if cluster.controllers[index].returncode != 0:  # it failed on its own: restart it
                faults.recoveries[f"controller exit {cluster.controllers[index].returncode}"] += 1
                cluster.start_controller(index)
        if time.monotonic() >= next_fault:
            faults.inject()
            next_fault = time.monotonic() + faults.random.expovariate(1 / mean_gap)


def check(cluster: Cluster, trials: int) -> tuple[list[tuple[str, bool]], dict[str, int]]:
    """The invariants, each (line, holds), and the figures."""
    study = optuna.load_study(study_name="pet-lora", storage=cluster.storage)
    client = MlflowClient(tracking_uri=cluster.tracking)
    mlflow.set_tracking_uri(cluster.tracking)  # `models:/` URIs resolve through the registry's URI
    mlflow.set_registry_uri(cluster.tracking)
    all_trials = study.get_trials()
    complete = [t for t in all_trials if t.state.name == "COMPLETE"]
    experiment = client.get_experiment_by_name("pet-lora").experiment_id
    found = client.search_runs([experiment], max_results=5000)
    finished = collections.Counter(
        int(r.data.tags["trial_number"])
        for r in found
        if "trial_number" in r.data.tags and r.info.status == "FINISHED"
    )
    by_id = {r.info.run_id: r for r in found}
    bad_runs = []
    for t in complete:
        run = by_id.get(t.user_attrs.get("run_id"))
        ok = run is not None and run.info.status == "FINISHED" and finished[t.number] == 1
        ok = ok and "val_force_mae_meV_per_A" in run.data.metrics
        ok = ok and {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} >= {
            f"adapter/{adapter.CONFIG_FILE}",
            f"adapter/{adapter.WEIGHTS_FILE}",
        }
        if not ok:
            bad_runs.append(t.number)
    bad_versions, versions = [], client.search_model_versions(max_results=5000)
    for version in versions:
        run = by_id.get(version.run_id)
        folder = Path(tempfile.mkdtemp(dir=cluster.workdir / "downloads"))
        files = mlflow.artifacts.download_artifacts(
            f"models:/{version.name}/{version.version}", dst_path=str(folder), tracking_uri=cluster.tracking
        )
        status = "no run" if run is None else run.info.status
        if status != "FINISHED" or adapter.digest(Path(files)) != version.tags.get("adapter_sha256"):
            bad_versions.append(f"{version.version} (trial {version.tags.get('trial_number')}, run {status})")
    running = [t.number for t in all_trials if t.state.name == "RUNNING"]
    queued = [t.number for t in all_trials if t.state.name == "WAITING"]  # retries the budget outran
    running_runs = [r.info.run_name for r in found if r.info.status == "RUNNING"]
    leaked = [
        str(p) for p in cluster.workdir.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()
    ]
    duplicates = sum(n - 1 for n in finished.values() if n > 1)
    lines = [
        (f"COMPLETE trials {len(complete)} of a budget of {trials}", len(complete) == trials),
        (f"trial numbers completed twice: {duplicates}", duplicates == 0),
        (f"COMPLETE trials without exactly one FINISHED run, metrics, adapter: {bad_runs}", not bad_runs),
        (f"registered versions {len(versions)}, bad (run not FINISHED or sha256 off): {bad_versions}",
         not bad_versions),
        (f"RUNNING trials {running}, RUNNING runs {running_runs} (WAITING, not needed: {queued})",
         not running and not running_runs),
        (f"files holding the password: {leaked}", not leaked),
    ]  # fmt: skip
    figures = {"lost": max(0, trials - len(complete)), "duplicates": duplicates,
               "running": len(running) + len(running_runs)}  # fmt: skip
    return lines, figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=60, help="stop after this long, whatever is left")
    parser.add_argument("--gap", type=float, default=8, help="mean seconds between faults")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="12 trials, a fault every 10 s, 8 minutes at most"
    )
    parser.add_argument("--workdir", type=Path, help="default: a fresh temporary folder, kept")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.gap, args.minutes = 12, 10, 8
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    (workdir / "downloads").mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # whatever a library writes to its current folder lands here too
    os.environ.setdefault("PET_LORA_SWEEPER_CACHE", str(workdir / "cache"))
    started = time.monotonic()
    with postgres_server.configured_or_throwaway() as server:
        server._admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        for database in ("optuna", "mlflow"):
            server._admin(f"CREATE DATABASE {database} OWNER {ROLE}")
        cluster = Cluster(workdir, server, args.trials, args.epochs)
        faults = Faults(cluster, PostgresControl(server), args.seed)
        cluster.start_mlflow()
        try:
            run_soak(cluster, faults, started + 60 * args.minutes, args.gap)
            faults.settle()
            lines, figures = check(cluster, args.trials)
        finally:
            faults.settle()
            for process in cluster.controllers:  # done by now, unless the time ran out
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
            cluster.stop_mlflow()
    left = cluster.left_running()
    lines.insert(-1, (f"processes started {len(cluster.seen)}, left running {left}", not left))
    wall = time.monotonic() - started
    for line, holds in lines:
        print(f"{'ok  ' if holds else 'FAIL'} {line}")
    print(f"workdir {workdir}; recoveries: {dict(faults.recoveries)}")
    kinds = ", ".join(f"{k} {faults.counts[k]}" for k in ("kill", "term", "postgres", "mlflow"))
    print(
        f"soak: {args.trials} trials, {sum(faults.counts.values())} faults ({kinds}), "
        f"lost {figures['lost']}, duplicates {figures['duplicates']}, "
        f"running {figures['running']}, {wall:.0f} s"
    )
    return 0 if all(holds for _, holds in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
