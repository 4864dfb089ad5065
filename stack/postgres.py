"""PostgreSQL 16 + pgvector from the `pgserver` wheel, data in data/letta/pgdata.

Listens on 127.0.0.1 only (TCP, because pg8000 in Letta's migrations cannot use a
unix-socket path), password auth (scram) with a password generated once and kept
mode 0600 under data/letta/config. Run as an unprivileged user when we are root.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from stack.install import LettaInstall
from stack.processes import ManagedProcess, StackError, as_user, port_open, run_checked, wait_until
from vtuber_letta.private_files import TRAVERSE_ONLY, create_private, private_dir, write_private

DB_NAME = "letta"
DB_USER = "letta"


class Postgres:
    def __init__(self, install: LettaInstall, data_dir: Path, port: int, run_as: str | None):
        self.install = install
        self.letta_dir = data_dir.resolve() / "letta"
        self.pgdata = self.letta_dir / "pgdata"
        self.port = port
        self.run_as = run_as
        self.password_file = self.letta_dir / "config" / "postgres-password"
        self.process = ManagedProcess(
            name="postgres",
            pid_file=self.letta_dir / "run" / "postgres.pid",
            log_file=self.letta_dir / "logs" / "postgres.log",
            marker=str(self.pgdata),
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        return f"postgresql://{DB_USER}:{self.password()}@127.0.0.1:{self.port}/{DB_NAME}"

    def password(self) -> str:
        if not self.password_file.exists():
            private_dir(self.password_file.parent)
            create_private(self.password_file, secrets.token_urlsafe(24) + "\n")
        return self.password_file.read_text().strip()

    def healthy(self) -> bool:
        return self.process.pid() is not None and port_open("127.0.0.1", self.port)

    def start(self, log=print) -> bool:
        """Start if not running; returns True if it was started now."""
        if self.process.pid() is not None:
            return False
        if port_open("127.0.0.1", self.port):
            raise StackError(f"port {self.port} is taken by another program: set VTL_POSTGRES_PORT")
        self._check_reachable_by_run_as()
        first_time = not (self.pgdata / "PG_VERSION").exists()
        if first_time:
            self._initdb(log)
        # Our own postmaster, in the foreground of its own session: the pid we record is the server's.
        self.process.start(
            [str(self.install.pg_bin / "postgres"), "-D", str(self.pgdata),
             "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.pgdata)],
            env=self._env(), cwd=self.pgdata, user=self.run_as,
        )
        if not wait_until(lambda: self._accepts_connections(), 60):
            raise StackError(f"postgres did not start on {self.address}:\n{self.process.log_tail()}")
        if first_time:
            self._create_database()
        return True

    def stop(self) -> bool:
        # postgres treats SIGTERM as "smart" shutdown (waits for clients); SIGINT is the fast one.
        pid = self.process.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        if not wait_until(lambda: self.process.pid() is None, 30):
            self.process.stop()  # escalate: SIGTERM, then SIGKILL
        self.process.pid_file.unlink(missing_ok=True)
        return True

    def _initdb(self, log) -> None:
        log(f"postgres: initialising {self.pgdata}")
        private_dir(self.pgdata)
        # initdb reads the password from a file: a 0600 one in a 0700 folder of initdb's own user
        # (the config folder, where the password files live, is the operator's alone).
        pwdir = Path(tempfile.mkdtemp(prefix=".initdb-", dir=self.letta_dir))
        pwfile = pwdir / "pw"
        write_private(pwfile, self.password() + "\n")
        self._own(self.pgdata, pwdir, pwfile)
        try:
            run_checked(self._as_user([str(self.install.pg_bin / "initdb"), "-D", str(self.pgdata),
                                       "-U", DB_USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                                       "-E", "UTF8", "--locale=C.UTF-8"]),
                        what="initdb", env=self._env())
        finally:
            shutil.rmtree(pwdir, ignore_errors=True)
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write("\n# vtuber-letta: loopback only, modest footprint for a 2-core machine\n"
                       "listen_addresses = '127.0.0.1'\nmax_connections = 200\nshared_buffers = 128MB\n")

    def max_connections(self) -> int:
        """The running server's max_connections (what every client's pool shares)."""
        return int(self._psql(DB_NAME, "SHOW max_connections", what="read max_connections").strip())

    def _create_database(self) -> None:
        self._psql("postgres", f"CREATE DATABASE {DB_NAME}", what="create database")
        self._psql(DB_NAME, "CREATE EXTENSION IF NOT EXISTS vector", what="create extension vector")

    def _psql(self, database: str, sql: str, *, what: str) -> str:
        # The password in the environment: a command line is visible to every local user in `ps`.
        env = {**self._env(), "PGPASSWORD": self.password()}
        argv = [str(self.install.pg_bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER,
                "-v", "ON_ERROR_STOP=1", "-At", "-d", database, "-c", sql]
        return run_checked(argv, what=what, env=env)

    def _accepts_connections(self) -> bool:
        if self.process.pid() is None:
            raise StackError(f"postgres exited during start:\n{self.process.log_tail()}")
        done = subprocess.run([str(self.install.pg_bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                              capture_output=True, env=self._env())
        return done.returncode == 0

    def _check_reachable_by_run_as(self) -> None:
        if not self.run_as:
            return
        if not self.letta_dir.exists():
            private_dir(self.letta_dir, TRAVERSE_ONLY)
        probe = subprocess.run(as_user(self.run_as, ["test", "-x", str(self.letta_dir)]), capture_output=True)
        if probe.returncode != 0:
            raise StackError(f"postgres runs as the unprivileged user {self.run_as!r}, which cannot reach "
                             f"{self.letta_dir}: make every folder above it world-executable or set VTL_DATA_DIR")

    def _as_user(self, argv: list[str]) -> list[str]:
        return as_user(self.run_as, argv) if self.run_as else argv

    def _own(self, *paths: Path) -> None:
        # Only pgdata (and initdb's password file) must belong to the postgres user: its log is
        # a file descriptor we open for it, so it never needs to write under data/ itself.
        if self.run_as:
            for path in paths:
                shutil.chown(path, user=self.run_as)

    def _env(self) -> dict[str, str]:
        return {"PATH": f"{self.install.pg_bin}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
