"""A released install: the wheel built from this checkout, installed into a fresh venv, runs from any
folder (conf/ ships in it as sweeper/conf); so does an editable install of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import REPO
from helpers.sweeps import tiny_overrides

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

# Nothing is downloaded: the fresh venv sees this venv's torch, metatrain, mlflow, ... through a .pth
# line. Python does not process .pth files inside a folder that a .pth line adds, so this venv's
# editable install of the project (its __editable__ finder) stays inactive there.
DEPENDENCIES = sysconfig.get_paths()["purelib"]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", ".whl", ".gl", "build", "dist", "*.egg-info",
                                    "__pycache__", ".*_cache", "outputs", "multirun", "mlruns", "mlartifacts",
                                    "*.db")  # fmt: skip
WHERE = """
import sys, sweeper, hydra_plugins.pet_lora_sweeper as plugin
from sweeper import config
print(sweeper.__file__, list(plugin.__path__)[0], config.CONF_DIR, sep="\\n")
print(any("Editable" in getattr(finder, "__name__", "") for finder in sys.meta_path))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout: pip builds in the source folder (build/, *.egg-info), not in ours."""
    copy = tmp_path_factory.mktemp("source") / "pet-lora-sweeper"
    shutil.copytree(REPO, copy, ignore=NOT_SOURCE)
    return copy


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    pip(["wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist)])
    (built,) = dist.glob("pet_lora_sweeper-*.whl")
    return built


def pip(arguments: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def fresh_venv(folder: Path) -> tuple[Path, Path]:
    """A venv without pip or anything else; returns its python and its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    return python, Path(site)


def see_dependencies(site: Path) -> None:
    (site / "_dependencies_of_the_test_venv.pth").write_text(DEPENDENCIES + "\n")


def run(python: Path, arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """From a folder outside the checkout, with nothing pointing Python at it."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    environment.update(PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    return subprocess.run([python, *arguments], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_the_wheel_holds_every_module_config_file_and_the_license(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = [
        p.relative_to(REPO).as_posix() for d in ("sweeper", "hydra_plugins") for p in (REPO / d).rglob("*.py")
    ]
    configs = [
        "sweeper/conf/" + p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")
    ]
    assets = ["sweeper/assets/" + p.name for p in (REPO / "sweeper" / "assets").iterdir()]
    assert "sweeper/conf/config.yaml" in configs
    assert not [name for name in [*modules, *configs, *assets] if name not in names]
    assert not [name for name in names if name.startswith("conf/") or name == "hydra_plugins/__init__.py"]
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


def test_the_wheel_in_a_fresh_venv_runs_from_any_folder(wheel: Path, tiny_data, tmp_path: Path) -> None:
    python, site = fresh_venv(tmp_path / "venv")
    pip(["--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    see_dependencies(site)  # after the install: pip there must not see this venv's editable install
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = run(python, ["-c", WHERE], elsewhere)
    assert where.returncode == 0, where.stderr[-3000:]
    module, plugin, conf, editable_finder = where.stdout.split("\n")[:4]
    print(f"sweeper imported from {module}")
    assert Path(module) == site / "sweeper" / "__init__.py" and not module.startswith(str(REPO))
    assert Path(plugin) == site / "hydra_plugins" / "pet_lora_sweeper"
    assert Path(conf) == site / "sweeper" / "conf" and editable_finder == "False"

    composed = run(python, ["-m", "sweeper", "--cfg", "job"], elsewhere)
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert "\nlora:\n" in composed.stdout and "  rank: " in composed.stdout
    plugins = run(python, ["-m", "sweeper", "--info", "plugins"], elsewhere)
    assert "OptunaMlflowSweeper" in plugins.stdout, plugins.stdout + plugins.stderr[-3000:]

    overrides = [o for o in tiny_overrides(tiny_data, elsewhere) if not o.startswith("train.epochs")]
    trial = run(python, ["-m", "sweeper", *overrides, "train.epochs=1"], elsewhere)
    assert trial.returncode == 0, trial.stdout[-3000:] + trial.stderr[-3000:]
    assert "trial finished: 1 epochs" in trial.stdout and (elsewhere / "mlflow.db").is_file()


def test_an_editable_install_finds_conf_and_the_plugin_in_the_checkout(source: Path, tmp_path: Path) -> None:
    python, site = fresh_venv(tmp_path / "venv")
    see_dependencies(site)  # before: the editable build needs this venv's setuptools
    editable = ["install", "--no-deps", "--no-index", "--no-build-isolation", "-e", str(source)]
    pip(["--python", str(python), *editable])
    where = run(python, ["-c", WHERE], tmp_path)
    assert where.returncode == 0, where.stderr[-3000:]
    module, plugin, conf, editable_finder = where.stdout.split("\n")[:4]
    assert Path(module) == source / "sweeper" / "__init__.py"
    assert Path(plugin) == source / "hydra_plugins" / "pet_lora_sweeper"
    assert Path(conf) == source / "conf" and editable_finder == "True"
    plugins = run(python, ["-m", "sweeper", "--info", "plugins"], tmp_path)
    assert "OptunaMlflowSweeper" in plugins.stdout, plugins.stdout + plugins.stderr[-3000:]


def test_pyproject_names_no_file_that_does_not_exist() -> None:
    text = (REPO / "pyproject.toml").read_text()
    named = set(re.findall(r"\b((?:sweeper|tests|docs|conf|benchmarks)/[\w./-]*)", text))
    named = {path for path in named if "_build" not in path}  # the docs' output folder, made by a build
    assert named and not [path for path in sorted(named) if not (REPO / path.rstrip("/.")).exists()]
