"""The Letta server 0.16.8: schema migrated from the sdist's alembic, started with a password.

The server never creates its own tables and its wheel has no migrations, so we
run the sdist's `alembic upgrade head` (a no-op when already at head) before
every start. It runs with a minimal environment we build here: the default tool
sandbox is a subprocess that inherits the server's whole environment, so
anything we do not pass is something a tool can never read.

It runs VTL_LETTA_WORKERS uvicorn workers, booted by stack/letta_workers.py (one worker alone
first) with database pools sized to the Postgres' max_connections; it is healthy only while
every worker lives, since uvicorn does not replace one that died.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from stack import letta_workers
from stack.install import LettaInstall
from stack.processes import ManagedProcess, StackError, run_checked, wait_until
from stack.tool_sandbox import server_env as tool_sandbox_env


class LettaServer:
    def __init__(self, install: LettaInstall, data_dir: Path, port: int, password: str,
                 pg_uri: str, model_env: dict[str, str], memory_gate_url: str, *, workers: int,
                 pg_max_connections: Callable[[], int]):
        self.install = install
        self.workers = workers
        self.pg_max_connections = pg_max_connections  # asked at start: the Postgres must be running
        self.letta_dir = data_dir.resolve() / "letta"
        self.port = port
        self.password = password
        self.pg_uri = pg_uri
        self.model_env = model_env
        self.memory_gate_url = memory_gate_url
        self.process = ManagedProcess(
            name="letta",
            pid_file=self.letta_dir / "run" / "letta.pid",
            log_file=self.letta_dir / "logs" / "letta-server.log",
            marker=f"server --host 127.0.0.1 --port {port}",
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def version(self) -> str | None:
        """The version the server reports on /v1/health/, or None when it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/v1/health/", timeout=3) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return body.get("version") if body.get("status") == "ok" else None

    def alive_workers(self) -> int:
        """How many of the server's workers live (0 when it is not running)."""
        pid = self.process.pid()
        return 0 if pid is None else letta_workers.alive_workers(pid, self.workers)

    def healthy(self) -> bool:
        return self.process.pid() is not None and self.version() is not None and self.alive_workers() == self.workers

    def migrate(self) -> None:
        run_checked([str(self.install.alembic_bin), "upgrade", "head"], what="letta schema migration (alembic)",
                    env={**self._env(), "LETTA_PG_URI": self.pg_uri}, cwd=self.install.sdist_dir, timeout=600)

    def start(self, log=print) -> bool:
        if self.process.pid() is not None:
            return False
        if self.version() is not None:
            raise StackError(f"another Letta server already answers on {self.address}: stop it or change LETTA_API_URL")
        connections = self._pg_connections()
        log("letta server: migrating the schema")
        self.migrate()
        runner = Path(__file__).with_name("redacting_runner.py")  # keeps the password out of the log
        boot = [sys.executable, letta_workers.__file__, "boot", "--"]
        self.process.start(
            [sys.executable, str(runner), *boot, str(self.install.letta_bin), "server", "--host", "127.0.0.1",
             "--port", str(self.port)],
            # asyncpg would demand TLS once pooling is on; this Postgres is loopback-only without TLS.
            env={**self._env(), "LETTA_PG_URI": f"{self.pg_uri}?ssl=disable",
                 letta_workers.WORKERS_ENV: str(self.workers), letta_workers.CONNECTIONS_ENV: str(connections),
                 letta_workers.HEALTH_URL_ENV: f"{self.url}/v1/health/",
                 "VTL_REDACT": "\n".join(filter(None, (self.password, urlsplit(self.pg_uri).password)))},
            cwd=self.letta_dir,
        )
        # More than one worker boots twice (one worker alone first: stack/letta_workers.py).
        if not wait_until(self._up_or_dead, 180 if self.workers == 1 else 360, interval=0.5):
            raise StackError(f"letta server did not become healthy on {self.address}:\n{self.process.log_tail()}")
        return True

    def stop(self) -> bool:
        return self.process.stop(timeout=30)

    def kill(self) -> bool:
        """SIGKILL the server and its workers mid-whatever (a crash, for fault tests): the runs they
        were working on stay `running` in the database."""
        return self.process.kill()

    def _up_or_dead(self) -> bool:
        if self.process.pid() is None:
            raise StackError(f"letta server exited during start:\n{self.process.log_tail(30)}")
        return self.healthy()

    def _pg_connections(self) -> int:
        """Connections the workers may hold together; refuses a worker count the Postgres cannot serve."""
        max_connections = self.pg_max_connections()
        connections = letta_workers.letta_connections(max_connections)
        try:
            letta_workers.pool_per_worker(self.workers, connections)
        except letta_workers.WorkersError as exc:
            raise StackError(f"letta server: {exc} (max_connections = {max_connections})") from None
        return connections

    def _env(self) -> dict[str, str]:
        config = self.letta_dir / "config"
        config.mkdir(parents=True, exist_ok=True)
        return {
            "PATH": f"{self.install.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(config),
            "LETTA_DIR": str(config),
            "LANG": "C.UTF-8",
            "LETTA_SERVER_SECURE": "true",
            "LETTA_SERVER_PASSWORD": self.password,
            # Our tools run in the slim sandbox (stack/tool_sandbox.py): stdlib only, and only the
            # variables they read cross into it; the memory tools ask the gate at this URL.
            **tool_sandbox_env(self.install.tool_sandbox),
            "VTL_MEMORY_GATE_URL": self.memory_gate_url,
            # Measured here: with provider traces on, every model call waited up to 60 s on the
            # trace insert into Postgres before timing out. The trace is only a debugging aid.
            "LETTA_TRACK_PROVIDER_TRACE": "false",
            # Letta's default is a new Postgres connection per query (NullPool). Measured here: a
            # connect now and then stalled for asyncpg's 60 s connect timeout, stalling the agent's
            # turn with it. A pool makes turns steady (and saves a SCRAM handshake per query).
            # Its size per worker: stack/letta_workers.py (pool_per_worker, docs/LETTA_NOTES.md).
            "LETTA_DISABLE_SQLALCHEMY_POOLING": "false",
            **self.model_env,
        }
