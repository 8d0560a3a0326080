"""What the tests share, one idea per module (the fixtures stay in tests/conftest.py):

- `sweeps`: the sweep runner, `python -m sweeper` run as a user runs it (one trial, `-m` sweeps),
  and the overrides of the tiny data the tests train on;
- `shell`: the plain-shell runner, the project's other commands (`sweeper.promote`, `metatrain`)
  run as from a user's shell;
- `studies`: the study reader, the Optuna study a sweep left, and what a finished sweep owes;
- `tracking`: the MLflow readers, and a real `mlflow server`;
- `browser`: headless chromium for the UI tests;
- `postgres_server`, `slurm_cluster`: the servers the tests start for a session;
- `outside_data`: data and base models that are not ours (a pytest plugin of session fixtures).

Imported as `helpers.<module>`: tests/ is not a package, and pytest puts it on `sys.path` (its
rootdir conftest), whichever way the tests are started.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
