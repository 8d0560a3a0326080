"""The PostgreSQL server of the tests: the one `$PET_LORA_SWEEPER_TEST_POSTGRES` names, else a
throwaway one started for the session (initdb and pg_ctl into a temporary folder, on a free loopback
port, trust auth for the superuser `postgres`, a password for any other role), so no server has to be
running beforehand.

Not pytest-postgresql: it runs initdb as the current user, and initdb refuses to run as root (CI
and the project's machines run as root); here root hands the server to the `postgres` system user
(or `nobody`).

A throwaway server outlives a session that is killed (SIGKILL, a cancelled CI job): its folder
records the session's process, and the next session to start one stops and removes the servers of
sessions that are gone. Nothing else is touched: not a server of a session still running, not a
PostgreSQL the machine runs itself.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy.engine import URL, make_url

ENVIRONMENT = "PET_LORA_SWEEPER_TEST_POSTGRES"  # e.g. postgresql://postgres@127.0.0.1:5432
FOLDER_PREFIX = "pet-lora-sweeper-postgres-"  # short: the server's socket lives in the folder
OWNER_FILE = "session.json"  # the process that started the server: {"pid", "started"}
SUPERUSER = "postgres"
HBA = f"""local all {SUPERUSER} trust
host all {SUPERUSER} 127.0.0.1/32 trust
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
"""


class NoPostgreSQL(RuntimeError):
    """Neither a configured server nor PostgreSQL's binaries to start one."""


@dataclass(frozen=True)
class Server:
    url: URL  # the server, no database: a user allowed to create databases, trusted (no password)
    restart: Callable[[], None] | None = None  # a throwaway server can be restarted (connections drop)

    @property
    def user(self) -> str:
        return self.url.username or SUPERUSER

    @contextlib.contextmanager
    def database(self, prefix: str) -> Iterator[str]:
        """A fresh database on this server, dropped afterwards; yields its SQLAlchemy URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self._admin(f"CREATE DATABASE {name}")
        try:
            yield self.url.set(drivername="postgresql", database=name).render_as_string(hide_password=False)
        finally:
            self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # a new connection: restarts

    def _admin(self, statement: str) -> None:
        import psycopg2

        admin = psycopg2.connect(
            host=self.url.host, port=self.url.port or 5432, user=self.user, password=self.url.password,
            dbname="postgres",
        )  # fmt: skip
        try:
            admin.autocommit = True
            admin.cursor().execute(statement)
        finally:
            admin.close()


@contextlib.contextmanager
def configured_or_throwaway() -> Iterator[Server]:
    configured = os.environ.get(ENVIRONMENT)
    if configured:
        yield Server(make_url(configured).set(database=None))
        return
    pg_ctl = find_pg_ctl()
    if pg_ctl is None:
        raise NoPostgreSQL(
            f"no PostgreSQL: neither ${ENVIRONMENT} nor pg_ctl (PATH, /usr/lib/postgresql/*/bin); "
            "apt-get install postgresql"
        )
    with throwaway(pg_ctl) as server:
        yield server


def find_pg_ctl() -> Path | None:
    """pg_ctl on PATH, else the newest of Debian's and Ubuntu's (kept off PATH by postgresql-common)."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path)
    installed = glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")
    newest = sorted(installed, key=lambda path: [int(part) for part in Path(path).parts[-3].split(".")])
    return Path(newest[-1]) if newest else None


@contextlib.contextmanager
def throwaway(pg_ctl: Path) -> Iterator[Server]:
    """A server of our own for as long as the context lasts, its folder removed afterwards."""
    stop_abandoned(pg_ctl)
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
    (folder / OWNER_FILE).write_text(json.dumps(_session(os.getpid())))  # before the server exists
    if os.geteuid() == 0:  # initdb and postgres refuse root: run them as an unprivileged user
        owner = pwd.getpwnam(_unprivileged_user())
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    as_owner = _as_owner_of(folder)
    data, log, port = folder / "data", folder / "server.log", free_port()
    run = functools.partial(_run, folder=folder, as_owner=as_owner)
    try:
        initdb_options = f"--username={SUPERUSER} --auth=trust --encoding=UTF8 --locale=C"
        run([str(pg_ctl), "initdb", "-s", "-D", str(data), "-o", initdb_options])
        # Other roles must sign in with their password: a test can check that one reaches the server.
        (data / "pg_hba.conf").write_text(HBA)
        # fsync off: the data lives as long as the test session.
        options = f"-F -p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={folder}"
        run([str(pg_ctl), "start", "-s", "-w", "-t", "60", "-D", str(data), "-l", str(log), "-o", options])
        again = [str(pg_ctl), "restart", "-s", "-w", "-t", "60", "-m", "fast", "-D", str(data)]
        restart = functools.partial(run, [*again, "-l", str(log), "-o", options])
        try:
            yield Server(URL.create("postgresql", username=SUPERUSER, host="127.0.0.1", port=port), restart)
        finally:
            run([str(pg_ctl), "stop", "-s", "-w", "-m", "fast", "-D", str(data)])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def stop_abandoned(pg_ctl: Path) -> None:
    """Stop the throwaway servers of sessions that are gone (killed before their clean-up) and
    remove their folders."""
    for record in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*/{OWNER_FILE}"):
        folder = record.parent
        try:
            session = json.loads(record.read_text())
        except (OSError, ValueError):  # being written by a session starting now
            continue
        if _session(session["pid"]) == session:
            continue  # its session is running
        data = folder / "data"
        if (data / "postmaster.pid").exists():
            stop = [str(pg_ctl), "stop", "-s", "-w", "-m", "immediate", "-D", str(data)]
            with contextlib.suppress(RuntimeError):  # already stopped: nothing to do
                _run(stop, folder=folder, as_owner=_as_owner_of(folder))
            if (data / "postmaster.pid").exists():
                continue  # still running: leave its folder rather than pull it from under it
        shutil.rmtree(folder, ignore_errors=True)


def _session(pid: int) -> dict[str, float] | None:
    """What identifies a process across PID reuse: its PID and its start time (None: gone)."""
    try:
        return {"pid": pid, "started": psutil.Process(pid).create_time()}
    except psutil.NoSuchProcess:
        return None


def _as_owner_of(folder: Path) -> dict[str, Any]:
    """subprocess arguments that run a command as the folder's owner, when we are root."""
    owner = folder.stat()
    if os.geteuid() != 0 or owner.st_uid == 0:
        return {}
    return {"user": owner.st_uid, "group": owner.st_gid, "extra_groups": []}


def _unprivileged_user() -> str:
    for name in (SUPERUSER, "nobody"):  # Debian's package creates `postgres`
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise NoPostgreSQL("running as root, and neither a `postgres` nor a `nobody` user to run PostgreSQL as")


def _run(command: list[str], folder: Path, as_owner: dict[str, Any]) -> None:
    environment = dict(os.environ, LC_ALL="C", LANG="C")
    done = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=120,
                          **as_owner)  # fmt: skip
    if done.returncode != 0:
        log = folder / "server.log"
        server_log = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}{server_log}")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (shared by the tests' servers)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
