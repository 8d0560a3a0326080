"""A one-node SLURM cluster for the tests: Debian's `slurm-wlm` and `munge`, started for the
session with every file in a temporary folder (configuration, state, spool, logs, munge's key and
socket), on free ports, so a SLURM already installed or running on the machine is neither used nor
disturbed. Clients find it through `SLURM_CONF` (`Cluster.environment`).

The configuration is the one that works on a single machine without cgroups: process tracking by
parent pid (`proctrack/linuxproc`), no task plugin, whole cores as the consumable resource, no
accounting (so no `sacct`: wait with `squeue`). `KillWait` is short: `scancel` sends SIGTERM, then
SIGKILL after that many seconds.

Root runs the SLURM daemons as root and munged as Debian's `munge` user; another user runs them all
as itself (SlurmUser and SlurmdUser), which is enough for jobs that user submits.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers.postgres_server import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo")
SBIN = ("/usr/sbin", "/sbin")  # Debian keeps the daemons off a user's PATH
KILL_WAIT = 5  # seconds between the SIGTERM and the SIGKILL of `scancel`
START_TIMEOUT = 60.0


class NoSlurm(RuntimeError):
    """SLURM's or munge's binaries are missing."""


@dataclass(frozen=True)
class Cluster:
    folder: Path
    node: str
    partition: str
    cpus: int

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    @property
    def environment(self) -> dict[str, str]:
        """This process's environment pointed at this cluster, without any other cluster's job
        variables (pytest itself may run inside a SLURM job)."""
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))
        }
        return inherited | {"SLURM_CONF": str(self.conf)}

    def run(self, *command: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            check: bool = True) -> str:  # fmt: skip
        """A SLURM client command (`sbatch`, `squeue`, ...) against this cluster, with `env` added
        to its environment; its stdout."""
        done = subprocess.run(list(command), cwd=cwd, env=self.environment | (env or {}),
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def jobs(self, finished: bool = True) -> dict[str, str]:
        """Job id (`<array job>_<task>` for array tasks) -> state (PENDING, RUNNING, COMPLETED,
        CANCELLED, ...): the jobs slurmctld still holds, finished ones for `MinJobAge` seconds."""
        states = ["--states=all"] if finished else []
        listing = self.run("squeue", "--noheader", "--array", "--format=%i %T", *states)
        return dict(line.split() for line in listing.splitlines() if line.strip())

    def log_tails(self, characters: int = 3000) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.out"):
            path = self.folder / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-characters:]}")
        return "\n".join(parts)


def find(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(Path(d) / name) for d in SBIN if os.access(Path(d) / name, os.X_OK)), None
    )


@contextlib.contextmanager
def throwaway() -> Iterator[Cluster]:
    """The cluster for as long as the context lasts; its jobs cancelled, its daemons stopped and its
    folder removed afterwards."""
    binaries = {name: find(name) for name in (*DAEMONS, *CLIENTS)}
    missing = [name for name, path in binaries.items() if path is None]
    if missing:
        raise NoSlurm(f"no SLURM: {', '.join(missing)} not found; apt-get install slurm-wlm munge")
    folder = Path(tempfile.mkdtemp(prefix="pet-lora-sweeper-slurm-"))  # short: munge's socket lives here
    folder.chmod(0o755)  # munged, as its own user, reaches its folder inside
    started: list[subprocess.Popen] = []
    try:
        cluster = _configure(folder)
        started.append(_start_munge(binaries["munged"], folder / "munge"))
        for daemon in ("slurmctld", "slurmd"):
            started.append(_start_daemon([binaries[daemon], "-D", "-f", str(cluster.conf)], folder, daemon))
        _wait_until_idle(cluster, started)
        try:
            yield cluster
        finally:
            _cancel_all(cluster)
    finally:
        for process in reversed(started):  # slurmd, slurmctld, then munged
            _stop(process)
        shutil.rmtree(folder, ignore_errors=True)


def _configure(folder: Path) -> Cluster:
    node, cpus = socket.gethostname().split(".")[0], len(os.sched_getaffinity(0))
    user = pwd.getpwuid(os.geteuid()).pw_name
    memory = _memory_mb() * 9 // 10  # below what slurmd measures, or it drains the node
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    settings = {
        "ClusterName": "pet-lora-tests",
        "SlurmctldHost": node,
        "SlurmctldPort": free_port(),
        "SlurmdPort": free_port(),
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={folder / 'munge' / 'munge.socket'}",
        "SlurmUser": user,
        "SlurmdUser": user,
        "StateSaveLocation": folder / "state",
        "SlurmdSpoolDir": folder / "spool",
        "SlurmctldPidFile": folder / "slurmctld.pid",
        "SlurmdPidFile": folder / "slurmd.pid",
        "SlurmctldLogFile": folder / "slurmctld.log",
        "SlurmdLogFile": folder / "slurmd.log",
        "PlugStackConfig": folder / "plugstack.conf",  # none: not the machine's /etc/slurm one
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "MpiDefault": "none",
        "ReturnToService": 2,
        "KillWait": KILL_WAIT,
        "MinJobAge": 300,  # finished jobs stay in squeue's list (--states=all): no accounting to ask
        "InactiveLimit": 0,
        "SchedulerParameters": "sched_interval=1",
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    lines.append(f"NodeName={node} CPUs={cpus} RealMemory={memory} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP")
    (folder / "slurm.conf").write_text("\n".join(lines) + "\n")
    (folder / "plugstack.conf").write_text("")
    return Cluster(folder, node, "debug", cpus)


def _start_munge(munged: str, folder: Path) -> subprocess.Popen:
    """munged with a fresh key of our own; as root, as the `munge` user Debian's package makes."""
    as_root = os.geteuid() == 0
    owner = pwd.getpwnam("munge") if as_root and _user_exists("munge") else pwd.getpwuid(os.geteuid())
    folder.mkdir()
    folder.chmod(0o755)  # clients reach the socket; munged refuses a folder others may write to
    key = folder / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    for path in (folder, key):
        if as_root:
            os.chown(path, owner.pw_uid, owner.pw_gid)
    command = [
        munged, "--foreground", f"--key-file={key}", f"--socket={folder / 'munge.socket'}",
        f"--pid-file={folder / 'munged.pid'}", f"--seed-file={folder / 'munged.seed'}",
    ]  # fmt: skip
    as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if as_root else {}
    with open(folder / "munged.out", "w") as output:
        process = subprocess.Popen(command, cwd=folder, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True, **as_owner)  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while not (folder / "munge.socket").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(f"munged did not start: {(folder / 'munged.out').read_text(errors='replace')}")
        time.sleep(0.1)
    return process


def _start_daemon(command: list[str], folder: Path, name: str) -> subprocess.Popen:
    with open(folder / f"{name}.out", "w") as output:
        return subprocess.Popen(command, cwd=folder, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _wait_until_idle(cluster: Cluster, daemons: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        if any(d.poll() is not None for d in daemons):
            break
        done = subprocess.run(
            ["sinfo", "--noheader", "--nodes", cluster.node, "--format=%T"],
            env=cluster.environment, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        state = done.stdout.strip()
        if done.returncode == 0 and state == "idle":
            return
        time.sleep(0.5)
    raise RuntimeError(f"the SLURM node is not idle after {START_TIMEOUT:.0f} s ({state!r}):\n"
                       + cluster.log_tails())  # fmt: skip


def _cancel_all(cluster: Cluster) -> None:
    """No job outlives the session: cancel them and wait until slurmd has ended them."""
    with contextlib.suppress(Exception):
        cluster.run("scancel", f"--partition={cluster.partition}", check=False)
        deadline = time.monotonic() + 3 * KILL_WAIT + 30
        while cluster.jobs(finished=False) and time.monotonic() < deadline:
            time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
