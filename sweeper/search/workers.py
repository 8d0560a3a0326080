"""Asynchronous trial workers on one machine: each takes the next trial as soon as it is free.

`hydra.sweeper.n_jobs=k` starts k worker processes. Each gets its own environment before
torch loads: with GPUs, worker i sees one GPU through CUDA_VISIBLE_DEVICES, round-robin
(`workers_per_gpu` puts several workers on each GPU, to fill a large GPU with small PET
models); the CPU cores are split between the workers. A worker runs the trials the
controller hands it in-process, one at a time (no re-import per trial), and sends back
each outcome. A worker that dies (SIGKILL, out of memory) closes its pipe: the controller
sees it at once, fails and re-queues its trial, and starts a fresh worker in its place.

Nothing here imports torch: the controller stays light and the workers choose their GPU
before torch is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

CONTEXT = multiprocessing.get_context("spawn")  # fresh interpreters: CUDA and threads set per worker
STOP_WAIT = 20.0  # seconds a stopped worker has to end its trial's run before it is killed


@dataclass(frozen=True)
class Slot:
    index: int
    gpu: str | None  # what CUDA_VISIBLE_DEVICES shows this worker; None: leave it as is
    threads: int

    def environment(self) -> dict[str, str]:
        threads = str(self.threads)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env


def plan(n_jobs: int, workers_per_gpu: int | None, gpus: list[str], cores: int) -> list[Slot]:
    """The workers: `n_jobs` of them, or `workers_per_gpu` on each GPU when that is set."""
    count = len(gpus) * workers_per_gpu if gpus and workers_per_gpu else n_jobs
    threads = max(1, cores // count)
    return [Slot(i, gpus[i % len(gpus)] if gpus else None, threads) for i in range(count)]


def visible_gpus(device: str) -> list[str]:
    """The GPUs workers may be pinned to: none when the trials run on the CPU."""
    if device == "cpu":
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU"))]


@dataclass
class Task:
    key: Any  # the controller's handle on the trial
    overrides: list[str]
    output_dir: Path


class Pool:
    def __init__(self, slots: list[Slot], log_dir: Path, pruner: Any, conf_dir: Path) -> None:
        self.slots, self.log_dir, self.pruner, self.conf_dir = slots, log_dir, pruner, conf_dir
        self.workers: dict[int, tuple[Any, Connection]] = {}
        self.busy: dict[int, Task] = {}
        for slot in slots:
            self._start(slot)

    def idle(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.index not in self.busy]

    def running(self) -> list[Task]:
        return list(self.busy.values())

    def submit(self, slot: Slot, task: Task) -> None:
        if not self.workers[slot.index][0].is_alive():  # died while idle: a fresh one
            self._replace(slot.index)
        self.workers[slot.index][1].send((task.overrides, str(task.output_dir)))
        self.busy[slot.index] = task

    def wait(self, timeout: float) -> list[tuple[Task, dict | None]]:
        """Finished tasks with their outcome; None when the worker died (it is replaced)."""
        connections = {self.workers[i][1]: i for i in self.busy}
        done = []
        for connection in wait(list(connections), timeout=timeout):
            index = connections[connection]
            try:
                outcome = connection.recv()
            except (EOFError, OSError):  # the worker is gone, mid-trial
                outcome = None
                self._replace(index)
            done.append((self.busy.pop(index), outcome))
        return done

    def close(self, stop_running: bool = False) -> None:
        """Idle workers are told to exit; with `stop_running` (the sweep was stopped) busy ones
        get SIGTERM too, which ends their trial's MLflow run KILLED before they exit."""
        for index, (process, connection) in self.workers.items():
            if stop_running and index in self.busy and process.is_alive():
                process.terminate()
            with contextlib.suppress(OSError):
                connection.send(None)
        for process, _ in self.workers.values():
            process.join(timeout=STOP_WAIT)
            if process.is_alive():
                process.kill()

    def _start(self, slot: Slot) -> None:
        parent, child = CONTEXT.Pipe()
        log = self.log_dir / f"worker-{slot.index}.log"
        process = CONTEXT.Process(
            target=serve,
            args=(child, log, self.pruner, self.conf_dir),
            name=f"worker-{slot.index}",
            daemon=True,
        )
        with _environment(slot.environment()):  # a spawned child copies the environment at start
            process.start()
        child.close()
        self.workers[slot.index] = (process, parent)

    def _replace(self, index: int) -> None:
        process, connection = self.workers.pop(index)
        connection.close()
        process.join(timeout=10)
        self._start(self.slots[index])


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Any:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def serve(connection: Connection, log: Path, pruner: Any, conf_dir: Path) -> None:
    """A worker's life: compose each trial's config, run it in-process, send the outcome.

    SIGTERM (from the controller when the sweep stops, or from anyone) and the controller's
    death (SIGKILL included: the kernel sends this worker SIGTERM) end the running trial's
    MLflow run KILLED, then the worker.
    """
    _terminate_with_parent()
    log.parent.mkdir(parents=True, exist_ok=True)
    stream = open(log, "a", buffering=1)  # noqa: SIM115  (the worker's whole life)
    os.dup2(stream.fileno(), 1)  # metatrain, torch and tqdm write here, not over the controller's bar
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream
    from hydra import compose, initialize_config_dir

    from sweeper import config
    from sweeper.search import job
    from sweeper.signals import Terminated, terminate_as_exception

    config.register()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"), terminate_as_exception():
        while True:
            try:
                task = connection.recv()
            except (EOFError, Terminated):
                return
            if task is None:
                return
            overrides, output_dir = task
            try:
                outcome = _run(compose, job, overrides, Path(output_dir), pruner)
            except Terminated as stop:
                print(f"worker stopped mid-trial ({stop})", flush=True)
                return
            connection.send(outcome)


def _terminate_with_parent() -> None:
    """Linux: SIGTERM to this worker when its controller dies, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run(compose: Any, job: Any, overrides: list[str], output_dir: Path, pruner: Any) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output_dir / "trial.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        cfg = compose(config_name="config", overrides=overrides)
        return job.run(cfg, output_dir, output_dir / "trial.log", pruner)
    except Exception as error:  # a failed trial: recorded by the controller, the worker goes on
        traceback.print_exc()
        return {"state": "fail", "error": f"{type(error).__name__}: {error}"}
    finally:
        root.removeHandler(handler)
        handler.close()
