"""One controller at a time on a study's few critical steps, across machines.

Controllers started at the same instant on other machines race on three things Optuna
does not make atomic: creating a fresh database's tables (PostgreSQL refuses the second
`CREATE TYPE`), creating the study, and counting the budget then asking for a trial (two
controllers that count at once both start one and overshoot `n_trials`). Each of these
runs under this lock, held in the storage's own database: a PostgreSQL advisory lock
(the database drops it when the holder's connection dies, so a dead machine never keeps
it), or, for SQLite, which lives on one machine, a flock on the database file (SQLite's
own locks are fcntl locks: no clash). Other databases get no lock: k controllers
starting at once may then run up to k - 1 extra trials.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import make_url


class StudyLock:
    def __init__(self, storage: str, study_name: str) -> None:
        self.engine: sqlalchemy.Engine | None = None
        self.file: Path | None = None
        try:
            url = make_url(storage)
        except sqlalchemy.exc.ArgumentError:  # not a database URL: nothing to lock
            return
        if url.get_backend_name() == "postgresql":
            # One kept connection: the pool loop takes the lock every second while a worker is idle.
            self.engine = sqlalchemy.create_engine(url, pool_size=1, pool_pre_ping=True)
            name = f"pet-lora-sweeper {url.database} {study_name}"
            digest = hashlib.sha256(name.encode()).digest()
            self.key = int.from_bytes(digest[:8], "big", signed=True)  # advisory locks take a bigint
        elif url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            if Path(url.database).parent.is_dir():  # else Optuna reports the missing folder
                self.file = Path(url.database)  # an empty file is a valid new SQLite database

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.engine is not None:
            with self.engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        elif self.file is not None:
            with open(self.file, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        else:
            yield

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
