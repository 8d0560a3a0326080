"""docker/: the compose file wires the services, reserves GPUs and keeps secrets out of git."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

DOCKER = Path(__file__).resolve().parents[1] / "docker"
# Each PostgreSQL driver SQLAlchemy may pick, and the pip requirement that brings it with its libpq.
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}
URL_FORMS = ["postgresql", "postgresql+psycopg", "postgresql+psycopg2"]


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_wires_postgres_mlflow_dashboard_and_gpu_workers() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "mlflow", "dashboard", "worker"}
    worker = services["worker"]
    (gpus,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]
    command = " ".join(worker["command"])
    assert "hydra.sweeper.storage=postgresql://" in command and "tracking.uri=http://mlflow:5000" in command
    assert "postgresql://" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "basic-auth" in (DOCKER / "mlflow-entrypoint.sh").read_text()
    assert "USER sweeper" in (DOCKER / "worker.Dockerfile").read_text()


def test_images_run_as_their_user_on_what_the_tests_run() -> None:
    mlflow = (DOCKER / "mlflow.Dockerfile").read_text()
    (artifacts,) = [v for v in compose()["services"]["mlflow"]["volumes"] if v.startswith("artifacts:")]
    folder = artifacts.split(":")[1]
    assert f"chown mlflow:mlflow {folder}" in mlflow and "USER mlflow" in mlflow  # writable volume
    worker = (DOCKER / "worker.Dockerfile").read_text()
    torch = metadata.version("torch").split("+")[0]
    assert f"torch=={torch}" in worker, f"the worker image's torch is not the tested {torch}"


def test_every_postgresql_url_form_has_its_driver_in_the_project_and_the_mlflow_image() -> None:
    """A plain postgresql:// means psycopg 3 with SQLAlchemy 2.1, psycopg2 before: both installed."""
    drivers = {make_url(f"{form}://u@db/optuna").get_dialect().driver for form in URL_FORMS}
    wanted = {DRIVER_PACKAGES[driver] for driver in drivers}
    pyproject = (DOCKER.parent / "pyproject.toml").read_text()
    required = pyproject.split("\ndependencies = [", 1)[1].split("\n]", 1)[0]  # the worker image's too
    image = (DOCKER / "mlflow.Dockerfile").read_text()
    for package in wanted:
        assert package in required, f"pyproject.toml does not require {package}"
        assert package in image, f"the MLflow image does not install {package}"


def test_no_secret_is_written_into_the_images_or_the_compose_file() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    for key in ("PASSWORD", "SECRET_KEY"):
        for line in text.splitlines():
            if key in line and ":" in line:
                assert "${" in line, f"literal secret in compose.yaml: {line.strip()}"
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        assert not re.search(r"(?i)password\s*=", dockerfile.read_text())
    services = compose()["services"]
    for name, service in services.items():  # process arguments are visible to every user
        arguments = " ".join(map(str, service.get("command", [])))
        assert "PASSWORD" not in arguments and ":${" not in arguments, f"{name}: a password in its command"
        for value in service.get("environment", {}).values():
            assert not re.search(r"://[^/@\s]*:\$\{[^}]*PASSWORD", str(value)), f"{name}: a password in a URL"
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]  # no auth: this host only
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DOCKER / ".env")], cwd=DOCKER)
    assert ignored.returncode == 0  # docker/.env never gets committed


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="needs the docker client with its compose plugin",
)
def test_docker_compose_config_accepts_the_file(tmp_path) -> None:
    env = tmp_path / ".env"
    env.write_text((DOCKER / ".env.example").read_text())
    compose_file = str(DOCKER / "compose.yaml")
    command = ["docker", "compose", "-f", compose_file, "--env-file", str(env), "config", "-q"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
