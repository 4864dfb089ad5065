"""Letta's uvicorn workers: their database pools, their boot, and whether every one is alive.

Standard library only: the letta container runs this file with the image's own Python
(docker-compose.yml), the local stack runs it with ours (stack/letta_server.py). Two commands:

    letta_workers.py boot -- COMMAND...   start the Letta server COMMAND with VTL_LETTA_WORKERS workers
    letta_workers.py check [--root PID]   exit 0 when Letta answers and all its workers live

What it rests on, read in the Letta 0.16.8 sdist (letta/settings.py, letta/server/rest_api/app.py,
letta/server/server.py) and uvicorn 0.29.0 (uvicorn/supervisors/multiprocess.py), which Letta pins:
- LETTA_UVICORN_WORKERS (`uvicorn_workers`, env prefix letta_) goes to uvicorn.run(workers=...);
  `letta server` has no --workers flag. With more than one, uvicorn's parent binds the port and
  spawns the workers (multiprocessing spawn); they share the listening socket.
- Every worker imports letta.server.rest_api.app, whose password is LETTA_SERVER_PASSWORD or else
  one it generates: every worker must get the same LETTA_SERVER_PASSWORD (the stack and compose set it).
- Every worker's startup creates the default organisation and user check-then-insert
  (server.init_async): workers booting side by side on an empty database race, and the loser's
  startup fails. So the workers are started only after one worker alone has booted: `boot` first
  runs the command with one worker until it answers, stops it, then runs it with them all. Always,
  not just on a first boot: nothing outside the database tells a first boot reliably, and a boot
  that is not the first costs one more start of one worker (measured in OPERATIONS.md).
- uvicorn 0.29 never replaces a worker that died: the parent lives on, the port stays open and the
  surviving workers serve it. /v1/health/ answers as long as one lives, so only counting the
  workers tells one is gone (`check`, and the stack's status).
- Each worker keeps its own SQLAlchemy pool (LETTA_PG_POOL_SIZE + LETTA_PG_MAX_OVERFLOW), so the
  workers together may hold workers x (pool + overflow) Postgres connections.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

WORKERS_ENV = "VTL_LETTA_WORKERS"  # how many workers (vtuber_letta/settings.py holds the default)
CONNECTIONS_ENV = "VTL_LETTA_PG_CONNECTIONS"  # Postgres connections this server's workers may hold together
HEALTH_URL_ENV = "VTL_LETTA_HEALTH_URL"
DEFAULT_HEALTH_URL = "http://127.0.0.1:8283/v1/health/"

# Connections a Postgres keeps for others than Letta's pools: its superuser slots (3 by default),
# the schema migration, psql, a backup.
RESERVED_CONNECTIONS = 10
# Per worker. Measured with one worker (docs/LETTA_NOTES.md): a turn holds a session and Letta starts
# background writes beside it, so with 8+ turns in flight a pool of 10 overflowed all the time and
# now and then a connect timed out (HTTP 500); 40 covers the bridge's 32 turns in flight per worker.
POOL_SIZE = 40
MAX_OVERFLOW = 10  # Letta's own default
MIN_POOL_SIZE = 5
WARM_UP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
SYSTEM_CERTS_DIR = Path("/etc/ssl/certs")


class WorkersError(RuntimeError):
    """The workers cannot be sized or booted as asked; the message says why and what to change."""


# --------------------------------------------------------------------------- sizing

def letta_connections(max_connections: int) -> int:
    """What one Letta server's workers may hold of a Postgres with this max_connections."""
    return max_connections - RESERVED_CONNECTIONS


def pool_per_worker(workers: int, connections: int) -> tuple[int, int]:
    """(LETTA_PG_POOL_SIZE, LETTA_PG_MAX_OVERFLOW) of each worker, so that workers x (pool + overflow)
    stays within `connections`; the measured pool of 40 where the budget allows it."""
    pool = min(POOL_SIZE, connections // workers - MAX_OVERFLOW)
    if pool < MIN_POOL_SIZE:
        need = workers * (MIN_POOL_SIZE + MAX_OVERFLOW)
        raise WorkersError(f"{workers} Letta workers need at least {need} Postgres connections "
                           f"({MIN_POOL_SIZE} + {MAX_OVERFLOW} each), but {connections} are available to them: "
                           f"lower {WORKERS_ENV} or raise Postgres' max_connections")
    return pool, MAX_OVERFLOW


def boot_env(env: dict[str, str]) -> tuple[int, dict[str, str]]:
    """(workers, the Letta server's environment): LETTA_UVICORN_WORKERS from VTL_LETTA_WORKERS, and
    the pool from VTL_LETTA_PG_CONNECTIONS when given (an explicit LETTA_PG_POOL_SIZE wins)."""
    raw = env.get(WORKERS_ENV, "")
    if not raw.isdigit() or int(raw) < 1:
        raise WorkersError(f"{WORKERS_ENV} must be a whole number of workers, 1 or more (got {raw!r})")
    workers, out = int(raw), dict(env)
    out["LETTA_UVICORN_WORKERS"] = str(workers)
    out.update(ca_store_env(env))
    if env.get(CONNECTIONS_ENV) and "LETTA_PG_POOL_SIZE" not in env:
        pool, overflow = pool_per_worker(workers, int(env[CONNECTIONS_ENV]))
        out.update(LETTA_PG_POOL_SIZE=str(pool), LETTA_PG_MAX_OVERFLOW=str(overflow))
    return workers, out


def ca_store_env(env: dict[str, str], certs_dir: Path = SYSTEM_CERTS_DIR) -> dict[str, str]:
    """SSL_CERT_DIR=the system's hashed CA directory, unless the environment names a store itself.

    Letta 0.16.8 builds a new AsyncOpenAI client for every model call and every embedding
    (letta/llm_api/openai_client.py), and httpx gives each one a fresh SSL context: by default
    from certifi's bundle, parsed whole every time (24 ms of CPU here, whether the endpoint is
    https or not). From SSL_CERT_DIR, OpenSSL reads a CA only when a handshake needs it (0.1 ms).
    Only a directory OpenSSL can look up in (its `<hash>.0` links, as Debian's ca-certificates
    makes them) is taken: an empty one would make every https model endpoint fail to verify."""
    if env.get("SSL_CERT_FILE") or env.get("SSL_CERT_DIR"):
        return {}
    try:
        hashed = any(name.endswith(".0") for name in os.listdir(certs_dir))
    except OSError:
        hashed = False
    return {"SSL_CERT_DIR": str(certs_dir)} if hashed else {}


# --------------------------------------------------------------------------- counting

def _parents() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def _is_spawned_worker(pid: int) -> bool:
    """A multiprocessing spawn child (uvicorn's workers are; its resource tracker is not)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in raw and b"--multiprocessing-fork" in raw


def worker_pids(root: int) -> list[int]:
    """uvicorn's workers below `root`: spawned children of a process that is not one itself (a
    worker's own children, e.g. its tool sandboxes, are not workers)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        current = todo.pop()
        for child in children.get(current, []):
            if _is_spawned_worker(child) and not _is_spawned_worker(current):
                found.append(child)
            todo.append(child)
    return sorted(found)


def alive_workers(root: int, expected: int) -> int:
    """How many of the `expected` workers live. One worker is the server process itself (uvicorn
    spawns none), alive as long as the server answers: the caller's health check decides that."""
    return expected if expected == 1 else len(worker_pids(root))


def answers(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read()).get("status") == "ok"
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- boot

def boot(command: list[str], env: dict[str, str]) -> int:
    """Warm up with one worker (when more are asked for), then become the server with them all."""
    workers, server_env = boot_env(env)
    url = env.get(HEALTH_URL_ENV) or DEFAULT_HEALTH_URL
    if workers > 1:
        print(f"[letta_workers] first one worker alone (it creates Letta's default organisation and user), "
              f"then {workers}", flush=True)
        code = _warm_up(command, {**server_env, "LETTA_UVICORN_WORKERS": "1"}, url)
        if code is not None:
            return code
        print(f"[letta_workers] one worker booted; starting {workers}", flush=True)
    os.execvpe(command[0], command, server_env)
    return 127  # not reached


def _warm_up(command: list[str], env: dict[str, str], url: str) -> int | None:
    """None when one worker booted and stopped again; else the exit code to leave with."""
    stopping: list[int] = []
    child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)

    def forward(received: int, _frame) -> None:
        stopping.append(received)
        child.send_signal(received)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    while not stopping and not answers(url):
        if child.poll() is not None:
            print(f"[letta_workers] the one-worker boot exited ({child.returncode})", flush=True)
            return child.returncode or 1
        if time.monotonic() > deadline:
            print(f"[letta_workers] one worker did not answer {url} within {WARM_UP_TIMEOUT_S:.0f} s", flush=True)
            stopping.append(signal.SIGTERM)
            child.terminate()
            break
        time.sleep(0.5)
    if not stopping:
        child.terminate()  # graceful: uvicorn finishes what it serves
    try:
        child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    return 128 + stopping[0] if stopping else None


def check(root: int, env: dict[str, str]) -> int:
    """0 when Letta answers and every worker lives; else 1 with what is wrong on stderr."""
    workers, _ = boot_env(env)
    url = env.get(HEALTH_URL_ENV) or DEFAULT_HEALTH_URL
    if not answers(url):
        print(f"letta does not answer {url}", file=sys.stderr)
        return 1
    alive = alive_workers(root, workers)
    if alive != workers:
        print(f"{alive} of {workers} Letta workers alive (uvicorn does not replace a dead one)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    try:
        if argv[:2] == ["boot", "--"] and len(argv) > 2:
            return boot(argv[2:], dict(os.environ))
        if argv[:1] == ["check"]:
            root = int(argv[2]) if argv[1:2] == ["--root"] and len(argv) > 2 else 1
            return check(root, dict(os.environ))
    except WorkersError as exc:
        print(f"letta_workers: {exc}", file=sys.stderr)
        return 2
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
