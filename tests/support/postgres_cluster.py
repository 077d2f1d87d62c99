"""A private PostgreSQL cluster for fault tests: its own data directory, port and socket.

A test that stops the database mid-traffic must not stop the shared server other tests
use at the same time, so it starts its own with `initdb` and `pg_ctl`. PostgreSQL
refuses to run as root; as root (the tests and CI are) every server command runs as the
`postgres` OS user through `runuser`, on a directory in /tmp that user owns (pytest's
own tmp directories are private to root). Trust authentication on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import HOST, free_port

SERVER_USER = "postgres"
DATABASE = "kdguard"
_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_COMMAND_TIMEOUT_S = 60.0


def find_bindir() -> Path | None:
    """The newest PostgreSQL install's bin directory with initdb and pg_ctl, if any."""
    candidates = sorted(Path("/").glob(_BIN_GLOB.lstrip("/")), key=_major, reverse=True)
    for path in candidates:
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    return None


def unavailable_reason() -> str | None:
    """Why a private cluster cannot be started here, or None if it can."""
    if find_bindir() is None:
        return f"PostgreSQL server binaries (initdb, pg_ctl) not found under {_BIN_GLOB}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} OS user to run PostgreSQL"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (PostgreSQL refuses to run as root)"
    return None


def _major(path: Path) -> int:
    version = path.parent.name
    return int(version) if version.isdigit() else 0


class PostgresCluster:
    """One cluster: `start()` and `stop()` may be called any number of times."""

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir = bindir
        self.root = root
        self.port = port
        self.data_dir = root / "data"
        self.socket_dir = root / "socket"
        self.log_path = root / "postgres.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://{SERVER_USER}@{HOST}:{self.port}/postgres"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+psycopg://{SERVER_USER}@{HOST}:{self.port}/{database}"

    def init(self) -> None:
        """initdb (trust auth, no fsync: the data is thrown away) and the `kdguard` database."""
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", SERVER_USER,
                  "-E", "UTF8", "--no-sync", "--no-instructions")  # fmt: skip
        self.start()
        self._run("createdb", "-h", HOST, "-p", str(self.port), "-U", SERVER_USER, DATABASE)

    def start(self, timeout_s: float = 30.0) -> float:
        """Start the server and wait until it accepts connections; returns the seconds taken."""
        started = time.monotonic()
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses={HOST} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", str(int(timeout_s)), "start")  # fmt: skip
        return time.monotonic() - started

    def stop(self, mode: str = "fast") -> float:
        """pg_ctl stop (`fast`: sessions are ended; `immediate`: as a crash would); seconds."""
        started = time.monotonic()
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")
        return time.monotonic() - started

    def running(self) -> bool:
        status = self._command("pg_ctl", "-D", str(self.data_dir), "status")
        return subprocess.run(status, capture_output=True, check=False).returncode == 0

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _command(self, program: str, *args: str) -> list[str]:
        argv = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            return ["runuser", "-u", SERVER_USER, "--", *argv]
        return argv

    def _run(self, program: str, *args: str) -> None:
        argv = self._command(program, *args)
        done = subprocess.run(  # our own fixed argv, no shell
            argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False,
            cwd=self.root,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"{program} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}\n"
                f"server log:\n{self.log_tail()}"
            )


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A started private cluster with an empty `kdguard` database; removed afterwards."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError(unavailable_reason())
    root = Path(tempfile.mkdtemp(prefix="kdguard-pg-"))
    cluster = PostgresCluster(bindir, root, free_port())
    try:
        cluster.init()
        yield cluster
    finally:
        if cluster.data_dir.exists() and cluster.running():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
