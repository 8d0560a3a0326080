"""The plain-shell runner: a command run as from a user's shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def plain_shell(module: str, *arguments: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m <module> <arguments>` in `cwd`, as typed in a fresh shell: without the tracking URI
    that MLflow exports into this process's environment when an in-process test sets one."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
