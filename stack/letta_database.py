"""The local stack's Letta database, for backup and restore: pg_dump, pg_restore and psql against
its Postgres (stack/postgres.py), over loopback TCP with its password."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from stack.postgres import DB_NAME, DB_USER
from stack.processes import StackError, run_checked

_COPY_HEADER = re.compile(r"^COPY (?:\"?(\w+)\"?\.)?\"?(\w+)\"? .* FROM stdin;$")


class LettaDatabase:
    """pg_dump / pg_restore / psql of the local stack's Postgres, over loopback TCP with its password."""

    def __init__(self, stack):
        self.pg = stack.postgres
        self.bin = self.pg.install.pg_bin

    def _env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                "PGPASSWORD": self.pg.password(), "PGCONNECT_TIMEOUT": "10"}

    def _conn(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.pg.port), "-U", DB_USER]

    def query(self, sql: str, database: str = DB_NAME) -> str:
        return run_checked([str(self.bin / "psql"), *self._conn(), "-d", database, "-X", "-A", "-t",
                            "-v", "ON_ERROR_STOP=1", "-c", sql], what="psql", env=self._env(), timeout=120).strip()

    def server_version(self) -> str:
        return self.query("SHOW server_version")

    def alembic_revision(self) -> str:
        return self.query("SELECT version_num FROM alembic_version")

    def table_counts(self, tables: tuple[str, ...]) -> dict[str, int]:
        sql = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM public.{t}" for t in tables)
        rows = (line.split("|") for line in self.query(sql).splitlines() if line)
        return {name: int(count) for name, count in rows}

    def dump(self, path: Path) -> None:
        # Custom format: compressed, restorable with pg_restore, one snapshot for the whole database.
        run_checked([str(self.bin / "pg_dump"), *self._conn(), "-d", DB_NAME, "-F", "c", "-f", str(path)],
                    what="pg_dump of the Letta database", env=self._env(), timeout=3600)
        path.chmod(0o600)

    def dump_contents(self, path: Path, tables: tuple[str, ...]) -> tuple[dict[str, int], str]:
        """Row counts of `tables` and the alembic revision, read back from the dump file itself."""
        argv = [str(self.bin / "pg_restore"), "--data-only", "-f", "-"]
        for table in (*tables, "alembic_version"):
            argv += ["-t", table]
        counts = {t: 0 for t in tables}
        revision, table = "", None
        # Streamed: the messages table may be large, and only the lines are counted.
        with subprocess.Popen([*argv, str(path)], env=self._env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace") as proc:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                if table is None:
                    match = _COPY_HEADER.match(line)
                    if match:
                        table = match.group(2)
                    continue
                if line == "\\.":
                    table = None
                elif table == "alembic_version":
                    revision = line.split("\t")[0]
                elif table in counts:
                    counts[table] += 1
            errors = proc.stderr.read()
        if proc.returncode != 0:
            raise StackError(f"the dump cannot be read back (pg_restore exit {proc.returncode}): "
                              f"{errors.strip()[-500:]}")
        if not revision:
            raise StackError("the dump holds no alembic revision: is this the Letta database?")
        return counts, revision

    def recreate(self) -> None:
        self.query(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)", database="postgres")
        self.query(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}", database="postgres")

    def restore(self, path: Path) -> None:
        # The dump carries the pgvector extension and the schema; one transaction: all or nothing.
        run_checked([str(self.bin / "pg_restore"), *self._conn(), "-d", DB_NAME, "--no-owner",
                     "--single-transaction", "--exit-on-error", str(path)],
                    what="pg_restore of the Letta database", env=self._env(), timeout=3600)
