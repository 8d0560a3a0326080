"""The MLflow readers: what trials logged to `workdir/mlflow.db`, and a real `mlflow server`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from helpers.postgres_server import free_port


def mlflow_client(workdir: Path) -> MlflowClient:
    """A client of the MLflow store `workdir/mlflow.db` (what `tiny_overrides` points trials at)."""
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def runs(workdir: Path, experiment: str = "pet-lora") -> list:
    """All MLflow runs of the experiment in `workdir/mlflow.db` (empty if none)."""
    if not (workdir / "mlflow.db").exists():
        return []
    store = mlflow_client(workdir)
    found = store.get_experiment_by_name(experiment)
    if found is None:
        return []
    return store.search_runs([found.experiment_id])


def adapter_folder(workdir: Path, run) -> Path:
    """The `adapter` artifact folder of `run` in `workdir/mlflow.db`, downloaded."""
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter"))


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
