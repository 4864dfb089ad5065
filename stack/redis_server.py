"""Redis for the local stack: Debian's redis-server, loopback only, persistence under data/redis.

The append-only file is on (fsync every second) because the bridge's queues are
the product's promise that no viewer message is lost, and a restart must not
drop them.
"""

from __future__ import annotations

from pathlib import Path

import redis

from stack.install import ensure_redis_server
from stack.processes import ManagedProcess, StackError, port_open, wait_until
from vtuber_letta.private_files import private_dir, write_private


def config_quoted(value: str) -> str:
    """`value` as one argument of a redis.conf line, whatever it holds (spaces, quotes, #)."""
    return '"' + "".join(f"\\x{byte:02x}" for byte in value.encode()) + '"'


class RedisServer:
    def __init__(self, data_dir: Path, host: str, port: int, password: str | None):
        self.dir = data_dir.resolve() / "redis"
        self.host = host
        self.port = port
        self.password = password
        self.process = ManagedProcess(
            name="redis",
            pid_file=self.dir / "redis.pid",
            log_file=self.dir / "redis.log",
            marker=f"127.0.0.1:{port}",
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def healthy(self) -> bool:
        return self.process.pid() is not None and self._ping()

    def start(self, log=print) -> bool:
        if self.process.pid() is not None:
            return False
        if port_open("127.0.0.1", self.port):
            raise StackError(f"port {self.port} is taken by another program: set REDIS_PORT (or REDIS_URL)")
        binary = ensure_redis_server(log)
        private_dir(self.dir)  # the append-only file holds every queued viewer message
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "300 1",
                "--protected-mode", "yes", "--daemonize", "no"]
        env = {"PATH": "/usr/bin:/bin"}
        if self.password:
            # A password on the command line would show in `ps`; a 0600 config file keeps it private.
            secret_conf = self.dir / "auth.conf"
            write_private(secret_conf, f"requirepass {config_quoted(self.password)}\n")
            argv = [binary, str(secret_conf), *argv[1:]]
        self.process.start(argv, env=env, cwd=self.dir)
        if not wait_until(self._ping, 30):
            raise StackError(f"redis did not start on {self.address}:\n{self.process.log_tail()}")
        return True

    def stop(self) -> bool:
        return self.process.stop()

    def _ping(self) -> bool:
        if not port_open("127.0.0.1", self.port):
            return False
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
