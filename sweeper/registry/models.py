"""Use a registered adapter: a model URI to a PET model, an ASE calculator or an exported file.

    from sweeper.registry.models import calculator
    atoms.calc = calculator("models:/base_pet_cu-lora@champion")

Any MLflow model URI works (`models:/name@alias`, `models:/name/3`, `models:/<model id>`,
`runs:/<run id>/adapter`) and so does a local adapter folder. A registry version's
adapter must match its `adapter_sha256` tag, and the base checkpoint the adapter was
trained on (found from the version's tags, or given) must match by sha256.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweeper import adapter, embedded
from sweeper import metatrain as mtt
from sweeper.files import file_sha256

# MLflow draws a progress bar for every two-file download; say so to turn it back on.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
_REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


class ModelError(ValueError):
    """A model URI that cannot be used: unknown name or alias, missing or tampered files."""


@dataclass
class Fetched:
    folder: Path  # the adapter files, downloaded
    version: ModelVersion | None  # None for URIs outside the registry


def version_of(client: MlflowClient, uri: str) -> ModelVersion | None:
    """The registry version behind `models:/name@alias` or `models:/name/N`; None for other URIs."""
    match = _REGISTRY_URI.fullmatch(uri)
    if match is None:
        return None
    name = match["name"]
    require_model(client, name, uri)
    try:
        if match["alias"] is not None:
            return client.get_model_version_by_alias(name, match["alias"])
        return client.get_model_version(name, match["version"])
    except MlflowException:
        aliases = sorted(client.get_registered_model(name).aliases)
        what = f"alias {match['alias']!r}" if match["alias"] else f"version {match['version']}"
        raise ModelError(
            f"{uri}: registered model {name!r} has no {what} (aliases: {aliases or 'none'}; "
            "`python -m sweeper.promote` sets champion)"
        ) from None


def require_model(client: MlflowClient, name: str, context: str) -> None:
    """ModelError naming what the registry does hold when `name` is not registered."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        hint = f"the registry has {known}" if known else "the registry is empty: run a sweep first"
        raise ModelError(f"{context}: no registered model {name!r} ({hint})") from None


def fetch(uri: str, folder: Path, client: MlflowClient | None = None) -> Fetched:
    """Download the adapter behind `uri` into `folder` and check it against its version."""
    client = client or MlflowClient()
    if Path(uri).is_dir():
        return Fetched(Path(uri), None)
    version = version_of(client, uri)
    source = f"models:/{version.name}/{version.version}" if version is not None else uri
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder)))
    except (MlflowException, OSError) as error:
        raise ModelError(f"{uri}: cannot download the adapter files ({error})") from None
    local = _adapter_folder(local, uri)
    if version is not None:
        check_digest(local, version)
    return Fetched(local, version)


def check_digest(folder: Path, version: ModelVersion) -> None:
    expected, found = version.tags.get("adapter_sha256"), adapter.digest(folder)
    if expected != found:
        raise ModelError(
            f"models:/{version.name}/{version.version}: adapter sha256 {found[:12]}… does not match "
            f"its adapter_sha256 tag {str(expected)[:12]}… (files or tag tampered with)"
        )


def base_checkpoint(fetched: Fetched, given: str | Path | None = None) -> Path:
    """The base the adapter was trained on: given, from the version's tags, or the embedded one."""
    wanted = adapter.read_config(fetched.folder)["base_checkpoint_sha256"]
    candidates = [given] if given is not None else []
    if given is None and fetched.version is not None and "base_checkpoint" in fetched.version.tags:
        candidates.append(fetched.version.tags["base_checkpoint"])
    if given is None:
        candidates.append(embedded.base_model_path())
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() and file_sha256(path) == wanted:
            return path
    if given is not None:
        problem = "not found" if not Path(given).is_file() else f"sha256 {file_sha256(given)[:12]}…"
        raise ModelError(f"base checkpoint {given}: {problem}, the adapter needs sha256 {wanted[:12]}…")
    raise ModelError(
        f"no base checkpoint with sha256 {wanted[:12]}… found (looked at {[str(c) for c in candidates]}); "
        "pass the one the adapter was trained on"
    )


def load(uri: str, base: str | Path | None = None, merge: bool = False) -> mtt.PET:
    """The base PET model with the adapter applied, in eval mode (`merge`: LoRA folded in)."""
    with tempfile.TemporaryDirectory(prefix="pet-lora-adapter-") as folder:
        fetched = fetch(uri, Path(folder))
        model = adapter.apply(fetched.folder, base_checkpoint(fetched, base))
    return mtt.merge_lora(model) if merge else model


def export(uri: str, path: Path, base: str | Path | None = None) -> Path:
    """The merged model as a TorchScript file for metatomic's ASE calculator and MD engines.

    Its outputs are the adapted model's targets: a `lora` or `full` adapter of a
    multi-head base keeps the conservative `energy` (forces and stress by autograd) and
    not the base's `non_conservative_*` heads, which it did not train.
    """
    mtt.export(load(uri, base, merge=True), path)
    return path


def calculator(uri: str, base: str | Path | None = None, device: str | None = None) -> Any:
    """An ASE calculator for the adapted model (metatomic's, on the merged, exported model):
    energy, and forces and stress as its gradients (never a non-conservative head)."""
    from metatomic_ase import MetatomicCalculator

    return MetatomicCalculator(mtt.export(load(uri, base, merge=True)), device=device, non_conservative=False)


def _adapter_folder(local: Path, uri: str) -> Path:
    """The folder holding the adapter files (a `runs:/` URI may point one level up)."""
    for candidate in (local, local / "adapter"):
        if (candidate / adapter.CONFIG_FILE).is_file():
            return candidate
    raise ModelError(f"{uri}: the downloaded files hold no {adapter.CONFIG_FILE} (not an adapter)")
