"""The tests' own throwaway PostgreSQL server (tests/helpers/postgres_server.py) does not outlive its
session."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import postgres_server

pytestmark = pytest.mark.slow  # end to end: `python -m pytest -m "not slow"` leaves these out

# A test session holding a throwaway server: prints its port and data folder, then waits to be killed.
SESSION = """
import time, psycopg2
from helpers import postgres_server
with postgres_server.throwaway(postgres_server.find_pg_ctl()) as server:
    connection = psycopg2.connect(host="127.0.0.1", port=server.url.port, user=server.user, dbname="postgres")
    cursor = connection.cursor()
    cursor.execute("SHOW data_directory")
    print(server.url.port, cursor.fetchone()[0], flush=True)
    connection.close()
    time.sleep(600)
"""


def test_a_server_left_by_a_killed_session_is_stopped_when_the_next_one_starts() -> None:
    pg_ctl = postgres_server.find_pg_ctl()
    if pg_ctl is None:
        pytest.skip("no PostgreSQL binaries (apt-get install postgresql)")
    killed = subprocess.Popen(
        [sys.executable, "-c", SESSION], cwd=Path(__file__).parent, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    port, data = killed.stdout.readline().split()
    try:
        os.killpg(killed.pid, signal.SIGKILL)  # as a CI job's cancel kills pytest: no clean-up runs
        killed.wait(timeout=30)
        assert _accepts(int(port))  # left behind
        with postgres_server.throwaway(pg_ctl) as server:  # the next session
            assert not _accepts(int(port)) and not Path(data).exists()
            assert _accepts(server.url.port)
    finally:  # the test's own mess, should it fail
        if Path(data).exists():
            owner = Path(data).stat()
            as_owner = {"user": owner.st_uid, "group": owner.st_gid} if os.geteuid() == 0 else {}
            stop = [str(pg_ctl), "stop", "-m", "immediate", "-D", data]
            subprocess.run(stop, capture_output=True, **as_owner)
            shutil.rmtree(Path(data).parent, ignore_errors=True)


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
