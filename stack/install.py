"""Installs what the local stack runs, once, with nothing done by hand.

- The Letta server 0.16.8 goes into its own virtual environment: it pins
  letta-client 1.7.12 while this project wants 1.12.1, and an unpinned install of
  it resolves today's packages and fails at import. So we download the server's
  sdist (which carries both its `uv.lock` and its alembic migrations), turn every
  registry pin of the lock into a pip constraint, and install with those.
- The `pgserver` wheel goes into the same venv: it ships PostgreSQL 16 with
  pgvector (Debian 12 packages no pgvector, and the server needs it).
- `redis-server` comes from Debian when it is missing.
- Postgres refuses to run as root, so when we are root a system user runs it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from contextlib import contextmanager
from pathlib import Path

from stack import tool_sandbox
from stack.processes import StackError, run_checked

LETTA_VERSION = "0.16.8"
PGSERVER_VERSION = "0.1.4"
# Extras the server needs here: the REST server and the Postgres drivers.
LETTA_REQUIREMENT = f"letta[server,postgres]=={LETTA_VERSION}"


class LettaInstall:
    """The server's own venv and unpacked sdist under `home` (default .letta-server/)."""

    def __init__(self, home: Path):
        self.home = home.resolve()
        self.venv = self.home / "venv"
        self.sdist_dir = self.home / f"letta-{LETTA_VERSION}"
        self.constraints = self.home / "constraints.txt"
        self.marker = self.home / "installed.json"
        # Letta's TOOL_EXEC_DIR: the slim environment our tools run in (stack/tool_sandbox.py).
        self.tool_sandbox = self.home / "tool-sandbox"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def letta_bin(self) -> Path:
        return self.venv / "bin" / "letta"

    @property
    def alembic_bin(self) -> Path:
        return self.venv / "bin" / "alembic"

    @property
    def pg_bin(self) -> Path:
        site = next((self.venv / "lib").glob("python3*/site-packages"), None)
        if site is None:
            raise StackError(f"no site-packages in {self.venv}: run `vtuber-letta stack install`")
        return site / "pgserver" / "pginstall" / "bin"

    def is_installed(self) -> bool:
        try:
            info = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return False
        return info.get("letta") == LETTA_VERSION and info.get("pgserver") == PGSERVER_VERSION and self.letta_bin.exists()

    def ensure(self, log=print) -> bool:
        """Install if needed; returns True when something was installed."""
        with _exclusive(self.home / ".install.lock"):
            installed = self._ensure_server(log)
            if not tool_sandbox.is_built(self.tool_sandbox):
                log(f"tool sandbox: building {self.tool_sandbox} (standard library only, no letta)")
                tool_sandbox.build(self.tool_sandbox, user=tool_sandbox.ensure_system_user(tool_sandbox.TOOL_USER))
                installed = True
            return installed

    def _ensure_server(self, log) -> bool:
        if self.is_installed():
            return False
        self.home.mkdir(parents=True, exist_ok=True)
        if not (self.sdist_dir / "uv.lock").exists():
            log(f"letta server: downloading the letta {LETTA_VERSION} sdist (migrations + lock file)")
            self._download_sdist()
        pins = constraints_from_uv_lock(self.sdist_dir / "uv.lock")
        self.constraints.write_text("\n".join(pins) + "\n")
        if not self.python.exists():
            run_checked([sys.executable, "-m", "venv", str(self.venv)], what="creating the Letta server venv")
        log(f"letta server: installing {LETTA_REQUIREMENT} with {len(pins)} pinned constraints (a few minutes)")
        run_checked(
            [str(self.python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
             LETTA_REQUIREMENT, f"pgserver=={PGSERVER_VERSION}", "-c", str(self.constraints)],
            what="installing the Letta server", timeout=3600,
        )
        self.marker.write_text(json.dumps({
            "letta": LETTA_VERSION, "pgserver": PGSERVER_VERSION,
            "constraints_sha256": hashlib.sha256(self.constraints.read_bytes()).hexdigest(),
        }, indent=2))
        return True

    def _download_sdist(self) -> None:
        download_dir = self.home / "download"
        download_dir.mkdir(exist_ok=True)
        run_checked(
            [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
             "--no-binary", ":all:", f"letta=={LETTA_VERSION}", "-d", str(download_dir)],
            what=f"downloading the letta {LETTA_VERSION} sdist", timeout=1800,
        )
        archive = download_dir / f"letta-{LETTA_VERSION}.tar.gz"
        if not archive.exists():
            raise StackError(f"pip did not produce {archive.name}")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(f"letta-{LETTA_VERSION}/") and (m.isfile() or m.isdir())]
            tar.extractall(self.home, members=members, filter="data")


def constraints_from_uv_lock(lock_path: Path) -> list[str]:
    """Every `name==version` of the lock whose source is a package registry."""
    lock = tomllib.loads(lock_path.read_text())
    pins = {
        f"{pkg['name']}=={pkg['version']}"
        for pkg in lock.get("package", [])
        if "registry" in pkg.get("source", {}) and "version" in pkg
    }
    return sorted(pins)


def ensure_redis_server(log=print) -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    if os.geteuid() != 0:
        raise StackError("redis-server is not installed; install Debian's redis-server package (needs root)")
    log("redis: installing Debian's redis-server package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_checked(["apt-get", "update", "-q"], what="apt-get update", env=env)
    run_checked(["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"],
                what="apt-get install redis-server", env=env)
    path = shutil.which("redis-server")
    if not path:
        raise StackError("redis-server is still missing after apt-get install")
    return path


def ensure_stack_user(name: str) -> str | None:
    """The unprivileged user that runs Postgres when we are root (None when we are not root)."""
    try:
        return tool_sandbox.ensure_system_user(name)
    except subprocess.CalledProcessError as exc:
        raise StackError(f"creating the system user {name!r} for Postgres failed: {exc.stderr or exc}") from None


@contextmanager
def _exclusive(lock_path: Path):
    """Serialise installs across processes (two test sessions may start at once)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
