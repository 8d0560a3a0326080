"""No password in any param, tag, artifact, log, console line or file we write.

Passwords reach us inside URLs: `postgresql://user:secret@host/db` (user-info) or
`...?password=secret` (a query string). `redact` masks both wherever text leaves the
process. Hydra writes a job's command line into `.hydra/overrides.yaml`, `hydra.yaml` and
`config.yaml`, and a sweep's into `multirun.yaml`: `scrub_hydra_files` rewrites those
files with the same masking once Hydra has written them. The storage URL itself never
travels to a trial on the command line (search/membership.py: an environment variable).
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, open_dict, read_write

_USERINFO = re.compile(r"(://[^/@:\s]+):[^@/\s]+@")
_QUERY = re.compile(r"([?&;](?:password|passwd|pwd|secret|token)=)[^&;\s'\"]+", re.IGNORECASE)
HYDRA_FILES = ("overrides.yaml", "hydra.yaml", "config.yaml")


def redact(text: str) -> str:
    """`postgresql://user:secret@host/db?password=x` -> `postgresql://user:***@host/db?password=***`."""
    return _QUERY.sub(r"\1***", _USERINFO.sub(r"\1:***@", text))


def scrub_hydra_files(folder: Path) -> None:
    """Mask passwords in the YAML files Hydra wrote under `folder` (a run or sweep directory)."""
    if not folder.is_dir():
        return
    paths = [
        *folder.glob("multirun.yaml"),
        *(p for name in HYDRA_FILES for p in folder.rglob(f".hydra/{name}")),
    ]
    for path in paths:
        text = path.read_text()
        if (masked := redact(text)) != text:
            path.write_text(masked)


def redact_config(cfg: DictConfig) -> None:
    """Mask passwords in the `hydra` node a sweep hands its launcher (the storage URL, the
    command line): every job's hydra.yaml, multirun.yaml and a SLURM job's pickle copy it."""
    hydra = cfg.get("hydra")
    if hydra is None:
        return
    with read_write(cfg), open_dict(cfg):
        if isinstance(hydra.sweeper.get("storage"), str):
            hydra.sweeper.storage = redact(hydra.sweeper.storage)
        for group in ("hydra", "task"):
            overrides = hydra.get("overrides", {}).get(group)
            if overrides is not None:
                hydra.overrides[group] = [redact(str(item)) for item in overrides]
