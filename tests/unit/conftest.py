"""Shared unit-test fixtures: a real, throw-away redis-server on a free loopback port.

Never the machine's own Redis (6379) and never a Redis of the local stack: each test session
starts its own server in a temporary folder, without persistence, and stops it at the end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start_redis(folder: Path) -> tuple[subprocess.Popen, int]:
    for _ in range(5):  # a free port can be taken between picking and binding: try another
        port = _free_port()
        proc = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--logfile", str(folder / f"redis-{port}.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers_ping(port):
                return proc, port
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"could not start {REDIS_SERVER} on a free loopback port; see the logs in {folder}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> str:
    """URL of a private redis-server for this test session."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed (apt-get install redis-server, or `vtuber-letta stack install`)")
    proc, port = _start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The private server's URL, emptied before the test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server
