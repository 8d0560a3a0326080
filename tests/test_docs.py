"""The documentation site: built with warnings as errors, its configuration reference generated
from the schema with every key and its meaning, read in a real browser."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from helpers.browser import chromium, needs_chromium
from selenium.webdriver.common.by import By

from hydra_plugins.pet_lora_sweeper.optuna_mlflow_sweeper import OptunaMlflowSweeperConf
from sweeper.config import Config


def _keys(cls: type, prefix: str) -> list[str]:
    keys = []
    for field in dataclasses.fields(cls):
        value = getattr(cls(), field.name)
        if field.name.startswith("_") or field.name == "defaults":
            continue
        keys += (
            _keys(type(value), f"{prefix}{field.name}.")
            if dataclasses.is_dataclass(value)
            else [f"{prefix}{field.name}"]
        )
    return keys


SCHEMA_KEYS = _keys(Config, "") + _keys(OptunaMlflowSweeperConf, "hydra.sweeper.")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(REPO / "docs"), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]  # -W: a warning fails the build
    return out


def test_the_reference_lists_every_schema_key_with_its_meaning(site: Path) -> None:
    rows = {}
    for line in (REPO / "docs" / "reference" / "configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    assert sorted(rows) == sorted(SCHEMA_KEYS)
    assert [key for key, cells in rows.items() if not cells[3]] == []  # every key says what it is
    assert (
        "| `finetune.replay.pool` | int \\| None | null |"
        in (REPO / "docs" / "reference" / "configuration.md").read_text()
    )


@needs_chromium
def test_the_built_reference_reads_in_a_browser(site: Path, tmp_path: Path) -> None:
    browser = chromium(tmp_path)
    try:
        browser.get((site / "reference" / "configuration.html").as_uri())
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Configuration reference")
        keys = {
            row.find_elements(By.TAG_NAME, "td")[0].text
            for row in browser.find_elements(By.CSS_SELECTOR, "tbody tr")
        }
        assert keys == set(SCHEMA_KEYS)
        browser.get((site / "index.html").as_uri())
        links = {a.text for a in browser.find_elements(By.CSS_SELECTOR, ".toctree-wrapper a")}
        assert "Configuration reference" in links
    finally:
        browser.quit()


def test_the_readme_stays_what_a_newcomer_needs_first() -> None:
    """A short README that points into the site (the manual lives in docs/)."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 220
    pages = ("getting-started", "sweeps", "workers", "forgetting", "registry", "reliability", "development")
    for page in pages:
        assert f"(docs/{page}.md)" in readme and (REPO / "docs" / f"{page}.md").is_file(), page
