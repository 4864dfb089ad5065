"""`vtuber-letta stack up | status | down`: the whole local stack, on loopback.

Parts, in start order: Redis, PostgreSQL+pgvector, the model endpoint (the
scripted stand-in unless a real one is configured), the Letta server, and the
memory gate that the memory tools write through (tools/memory_gate.py), then the console
(console/, the streamer's web page; `vtuber-letta console`). `up` is
idempotent (a healthy part is left alone) and returns only once every part is
healthy; `down` stops, in reverse order, only processes that `up` started.
Letta runs VTL_LETTA_WORKERS uvicorn workers; uvicorn does not replace one that
dies, so `status` counts them and `up` restarts a Letta that has lost one.
A Letta or Redis address that is not loopback is someone else's server: the
stack reports it and leaves it alone.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stack.install import LettaInstall, ensure_stack_user
from stack.letta_server import LettaServer
from stack.postgres import Postgres
from stack.processes import ManagedProcess, StackError, listening_addresses, port_open, wait_until
from stack.redis_server import RedisServer
from vtuber_letta.private_files import TRAVERSE_ONLY, make_private, private_dir
from vtuber_letta.settings import LOOPBACK_HOSTS, Settings

SCRIPTED_MODEL_KEY = "scripted-model-needs-no-key"


@dataclass
class PartStatus:
    name: str
    address: str
    state: str  # healthy | down | external | unhealthy
    detail: str = ""
    pid: int | None = None
    listens: tuple[str, ...] = ()  # every TCP address the part's processes listen on


class HttpPart:
    """A part of ours that answers GET /health with {"status": "ok"} on a loopback port."""

    host = "127.0.0.1"
    port: int
    process: ManagedProcess

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def healthy(self) -> bool:
        if self.process.pid() is None:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as resp:
                return json.loads(resp.read()).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def stop(self) -> bool:
        return self.process.stop(timeout=10)

    def _start_cli(self, args: list[str], env: dict[str, str], cwd: Path, port_setting: str) -> bool:
        """Start `vtuber-letta ARGS` with the project's own interpreter; False if it already runs."""
        if self.process.pid() is not None:
            return False
        if port_open(self.host, self.port):
            raise StackError(f"port {self.port} is taken by another program: set {port_setting}")
        self.process.start([sys.executable, "-m", "vtuber_letta.commands.cli", *args], env=env, cwd=cwd)
        if not wait_until(self.healthy, 30):
            raise StackError(f"{self.process.name} did not start on {self.address}:\n{self.process.log_tail()}")
        return True


class ScriptedModelProcess(HttpPart):
    """The stand-in for the upstream model (see stack/scripted_model.py)."""

    def __init__(self, data_dir: Path, port: int):
        self.port = port
        self.process = ManagedProcess(
            name="scripted-model",
            pid_file=data_dir.resolve() / "letta" / "run" / "scripted-model.pid",
            log_file=data_dir.resolve() / "letta" / "logs" / "scripted-model.log",
            marker=f"stack.scripted_model --host 127.0.0.1 --port {port}",
        )

    def start(self, log=print) -> bool:
        if self.process.pid() is not None:
            return False
        if port_open("127.0.0.1", self.port):
            raise StackError(f"port {self.port} is taken by another program: set VTL_SCRIPTED_MODEL_PORT")
        repo_root = Path(__file__).resolve().parent.parent
        self.process.start([sys.executable, "-m", "stack.scripted_model", "--host", "127.0.0.1", "--port", str(self.port)],
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo_root)}, cwd=repo_root)
        if not wait_until(self.healthy, 30):
            raise StackError(f"scripted model did not start on {self.address}:\n{self.process.log_tail()}")
        return True


def _cli_process(settings: Settings, command: str, port: int) -> ManagedProcess:
    """The ManagedProcess of a part run as `vtuber-letta COMMAND --port PORT` (pid and log in data/letta)."""
    data = settings.data_dir.resolve()
    return ManagedProcess(name=command, pid_file=data / "letta" / "run" / f"{command}.pid",
                          log_file=data / "letta" / "logs" / f"{command}.log",
                          marker=f"vtuber_letta.commands.cli {command} --port {port}")


def _cli_env(settings: Settings) -> dict[str, str]:
    """What every such part reads: the data dir, Letta, the memory gate, the log level. Nothing else
    of ours: it runs in the data dir, so no stray .env is read either."""
    s = settings
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "LANG": "C.UTF-8",
            "VTL_DATA_DIR": str(s.data_dir.resolve()), "LETTA_API_URL": s.letta_api_url,
            "LETTA_API_KEY": s.letta_password, "VTL_MEMORY_GATE_URL": s.memory_gate_url,
            "VTL_MEMORY_GATE_SECRET": s.memory_gate_secret, "VTL_LOG_LEVEL": s.log_level}


class MemoryGateProcess(HttpPart):
    """The memory gate (tools/memory_gate.py), run with the project's own interpreter."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.host, self.port = settings.memory_gate_address
        self.process = _cli_process(settings, "memory-gate", self.port)

    def start(self, log=print) -> bool:
        env = _cli_env(self.settings)
        if self.settings.memory_gate_listen:
            env["VTL_MEMORY_GATE_LISTEN"] = self.settings.memory_gate_listen
        return self._start_cli(["memory-gate", "--port", str(self.port)], env, self.settings.data_dir.resolve(),
                               "VTL_MEMORY_GATE_URL")


class ConsoleProcess(HttpPart):
    """The console (console/), run with the project's own interpreter like the memory gate."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.host, self.port = settings.console_host, settings.console_port
        self.process = _cli_process(settings, "console", self.port)

    def start(self, log=print) -> bool:
        s = self.settings
        persona = s.persona_config if s.persona_config.is_absolute() else (Path.cwd() / s.persona_config)
        # Besides what every part reads: Redis, the bridge's names, the template, and the password,
        # generated here (if not configured) so its file is there for the streamer to read.
        env = {**_cli_env(s), "REDIS_URL": s.redis_connection_url,
               "VTL_CONSOLE_HOST": s.console_host, "VTL_CONSOLE_PASSWORD": s.console_password,
               "VTL_TEMPLATE": s.template_name, "VTL_PERSONA_CONFIG": str(persona),
               "VTL_BRIDGE_REQUEST_QUEUE": s.bridge_request_queue,
               "VTL_BRIDGE_METRICS_HOST": s.bridge_metrics_host, "VTL_BRIDGE_METRICS_PORT": str(s.bridge_metrics_port)}
        if s.letta_model:
            env["LETTA_MODEL"] = s.letta_model
        if not self._start_cli(["console", "--port", str(self.port)], env, s.data_dir.resolve(), "VTL_CONSOLE_PORT"):
            return False
        log(f"console: http://{self.address}/ (password: {s.console_password_hint})")
        return True


class Stack:
    def __init__(self, settings: Settings, log=print):
        self.settings = settings
        self.log = log
        self.install = LettaInstall(settings.letta_server_home)
        data = settings.data_dir
        redis_host, redis_port = settings.redis_address
        self.manages_redis = redis_host in LOOPBACK_HOSTS
        self.manages_letta = settings.letta_host in LOOPBACK_HOSTS
        self.redis = RedisServer(data, redis_host, redis_port, settings.redis_secret)
        self.postgres = Postgres(self.install, data, settings.postgres_port, run_as=None)
        self.model = None if settings.uses_real_model else ScriptedModelProcess(data, settings.scripted_model_port)
        self.memory_gate = MemoryGateProcess(settings)
        self.console = ConsoleProcess(settings)
        self._letta: LettaServer | None = None

    @property
    def letta(self) -> LettaServer:
        if self._letta is None:
            self._letta = LettaServer(self.install, self.settings.data_dir, self.settings.letta_port,
                                      self.settings.letta_password, self.postgres.uri, self._model_env(),
                                      self.settings.memory_gate_url, workers=self.settings.letta_workers,
                                      pg_max_connections=self.postgres.max_connections)
        return self._letta

    def _model_env(self) -> dict[str, str]:
        s = self.settings
        if not s.uses_real_model:
            return {"OPENAI_API_KEY": SCRIPTED_MODEL_KEY, "OPENAI_BASE_URL": s.scripted_model_base_url}
        env = {}
        if s.openai_api_key:
            env["OPENAI_API_KEY"] = s.openai_api_key.get_secret_value()
        if s.openai_base_url:
            env["OPENAI_BASE_URL"] = s.openai_base_url
        if s.ollama_base_url:
            env["OLLAMA_BASE_URL"] = s.ollama_base_url
        return env

    # ---------------- commands ----------------
    def up(self) -> list[PartStatus]:
        started: list[str] = []
        self.make_data_private()
        if self.manages_redis and self.redis.start(self.log):
            started.append("redis")
        if self.manages_letta:
            if self.install.ensure(self.log):
                self.log("letta server: installed")
            self.postgres.run_as = ensure_stack_user(self.settings.stack_user)
            if self.postgres.start(self.log):
                started.append("postgres")
            if self.model is not None and self.model.start(self.log):
                started.append("scripted-model")
            self._restart_letta_short_of_workers()
            if self.letta.start(self.log):
                started.append("letta")
            if self.memory_gate.start(self.log):
                started.append("memory-gate")
            if self.console.start(self.log):
                started.append("console")
        # Again: Letta's schema migration (run before the server, without our umask) leaves
        # config/.letta readable, and Letta saves its database URI, password included, there.
        self.make_data_private()
        self.log("started: " + (", ".join(started) if started else "nothing (already up)"))
        statuses = self.status()
        bad = [s for s in statuses if s.state not in ("healthy", "external")]
        if bad:
            raise StackError("not healthy after start: " + ", ".join(f"{s.name} ({s.state})" for s in bad))
        return statuses

    def _restart_letta_short_of_workers(self) -> None:
        """A Letta that lost a worker still serves with the rest, at their capacity: not restarted
        behind the operator's back mid-stream (a restart stops every turn for a boot), but `up`,
        the operator's "make it whole", restarts it."""
        letta = self.letta
        if letta.process.pid() is None or (alive := letta.alive_workers()) == letta.workers:
            return
        self.log(f"letta server: {alive} of {letta.workers} workers alive (uvicorn does not replace a dead one): "
                 "restarting it")
        letta.stop()

    def make_data_private(self) -> None:
        """The stack's folders private (0700, files 0600), also those an older version made 0755/0644.

        data/letta stays enterable (0711, not listable) for the unprivileged Postgres user on its
        way to pgdata, which Postgres itself keeps 0700. Not touched: data/ itself and the
        operator's own folders in it (config, uploads).
        """
        letta = self.settings.data_dir / "letta"
        if self.manages_letta:
            private_dir(letta, TRAVERSE_ONLY)
            for name in ("config", "logs", "run"):
                make_private(private_dir(letta / name))
        if self.manages_redis:
            make_private(private_dir(self.settings.data_dir / "redis"))

    def down(self) -> list[str]:
        stopped = []
        for name, part in (("console", self.console if self.manages_letta else None),
                           ("memory-gate", self.memory_gate if self.manages_letta else None),
                           ("letta", self.letta if self.manages_letta else None), ("scripted-model", self.model),
                           ("postgres", self.postgres if self.manages_letta else None),
                           ("redis", self.redis if self.manages_redis else None)):
            if part is not None and part.stop():
                stopped.append(name)
        return stopped

    def restart_letta(self) -> None:
        """Stop and start only the Letta server (tests use it to prove memory survives a restart)."""
        self.letta.stop()
        self.letta.start(self.log)

    def status(self) -> list[PartStatus]:
        out = []
        redis_addr = f"{self.redis.host}:{self.redis.port}"
        if self.manages_redis:
            out.append(self._status("redis", self.redis, redis_addr))
        else:
            out.append(PartStatus("redis", redis_addr, "external", "not managed by this stack"))
        if not self.manages_letta:
            out.append(PartStatus("letta", self.settings.letta_api_url, "external", "not managed by this stack"))
            return out
        out.append(self._status("postgres", self.postgres, self.postgres.address, "pgvector, data/letta/pgdata"))
        if self.model is None:
            endpoint = self.settings.openai_base_url or self.settings.ollama_base_url or "api.openai.com"
            out.append(PartStatus("model", endpoint, "external", "your model endpoint"))
        else:
            out.append(self._status("model", self.model, self.model.address, "scripted stand-in for the upstream model"))
        out.append(self._status("letta", self.letta, self.letta.address, self._letta_detail()))
        out.append(self._status("gate", self.memory_gate, self.memory_gate.address, "memory gate for the memory tools"))
        out.append(self._status("console", self.console, self.console.address, "the streamer's console (web page)"))
        return out

    def _letta_detail(self) -> str:
        letta = self.letta
        if letta.process.pid() is None:
            return ""
        version, alive = letta.version(), letta.alive_workers()
        if alive != letta.workers:
            return (f"{alive} of {letta.workers} workers alive: uvicorn does not replace a dead one; "
                    "`vtuber-letta stack up` restarts Letta")
        return f"Letta {version}, {alive} worker{'s' if alive > 1 else ''}, password required" if version else ""

    @staticmethod
    def _status(name, part, address, detail="") -> PartStatus:
        pid = part.process.pid()
        if pid is None:
            return PartStatus(name, address, "down")
        return PartStatus(name, address, "healthy" if part.healthy() else "unhealthy", detail, pid,
                          tuple(sorted(listening_addresses(pid))))


def format_status(statuses: list[PartStatus]) -> str:
    lines = [f"{'part':<9} {'address':<24} {'state':<10} {'pid':>7}  {'listening on':<24} detail"]
    for s in statuses:
        listens = ",".join(s.listens) or "-"
        lines.append(f"{s.name:<9} {s.address:<24} {s.state:<10} {s.pid or '-':>7}  {listens:<24} {s.detail}")
    return "\n".join(lines)
