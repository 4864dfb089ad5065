"""Issue 18: docker-compose.scale-out.yml, several Letta servers behind nginx on one Postgres and
several bridge replicas on one Redis. Validated as the base file is (tests/unit/test_compose.py:
Debian's `docker-compose config`), and its nginx configuration with Debian's nginx: `nginx -t`, then
a real nginx in front of two stand-in servers, which must share the requests and pass a token
stream on as it comes."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from stack import letta_workers
from stack.processes import free_port, port_open, wait_until
from tests.unit.test_compose import BASE, ENV_EXAMPLE, LETTA_SERVER_VARIABLES, REPO, SETTINGS_VARIABLES, _env_example, _interpolated, run_validator
from vtuber_letta.settings import Settings

SCALE_OUT = REPO / "docker-compose.scale-out.yml"
NGINX_CONF = REPO / "stack" / "letta-lb.nginx.conf"
PG_PASSWORD = "a-postgres-password"
# Read in the Letta containers by the workers' boot (stack/letta_workers.py) and the line filter.
OURS_IN_LETTA = {letta_workers.WORKERS_ENV, letta_workers.CONNECTIONS_ENV, "VTL_REDACT", "VTL_MEMORY_GATE_URL"}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    env = tmp_path_factory.mktemp("env") / "scale-out.env"
    env.write_text(ENV_EXAMPLE.read_text() + f"LETTA_PG_PASSWORD={PG_PASSWORD}\n")
    done = run_validator(SCALE_OUT, env_file=env)
    assert done.returncode == 0, done.stderr
    assert "variable is not set" not in done.stderr, done.stderr
    return yaml.safe_load(done.stdout)


def _letta_servers(config: dict) -> dict[str, dict]:
    return {name: s for name, s in config["services"].items() if re.fullmatch(r"letta-[a-z]", name)}


def _bridges(config: dict) -> dict[str, dict]:
    return {name: s for name, s in config["services"].items() if name.startswith("bridge-")}


def test_the_postgres_password_is_required(tmp_path):
    done = run_validator(SCALE_OUT, env_file=ENV_EXAMPLE)
    assert done.returncode != 0 and "set LETTA_PG_PASSWORD in .env" in done.stderr, done.stderr


def test_every_variable_is_one_the_code_or_letta_reads(config):
    unknown = _interpolated(SCALE_OUT) - SETTINGS_VARIABLES - set(LETTA_SERVER_VARIABLES)
    assert not unknown, f"the scale-out file uses ${{{', '.join(sorted(unknown))}}}, which nothing reads"
    for name, server in _letta_servers(config).items():
        unknown = set(server["environment"]) - set(LETTA_SERVER_VARIABLES) - OURS_IN_LETTA
        assert not unknown, f"{name} gets {sorted(unknown)}: not variables Letta 0.16.8 (or our boot) reads"
    for name in ("provision", "memory-gate", *_bridges(config)):
        unknown = set(config["services"][name]["environment"]) - SETTINGS_VARIABLES
        assert not unknown, f"{name} gets {sorted(unknown)}, which vtuber_letta.settings never reads"


def test_several_letta_servers_on_one_postgres_each_within_its_share(config):
    services = config["services"]
    servers = _letta_servers(config)
    assert len(servers) >= 2
    base_letta = yaml.safe_load(BASE.read_text())["services"]["letta"]
    max_connections = int(re.search(r"max_connections=(\d+)", " ".join(services["postgres"]["command"])).group(1))
    shares = 0
    for name, server in servers.items():
        env = server["environment"]
        assert server["command"] == base_letta["command"], f"{name} boots otherwise than docker-compose.yml's letta"
        assert env["LETTA_PG_URI"] == f"postgresql://letta:{PG_PASSWORD}@postgres:5432/letta?ssl=disable"
        assert env["LETTA_DISABLE_SQLALCHEMY_POOLING"] == "false"
        assert env["LETTA_SERVER_PASSWORD"] == _env_example()[0]["LETTA_API_KEY"]  # one password, every server
        assert env["VTL_REDACT"].splitlines() == [env["LETTA_SERVER_PASSWORD"], PG_PASSWORD]
        assert env["LETTA_REDIS_HOST"] == "letta-redis"
        # The default worker count boots within the server's share of the connections.
        workers, server_env = letta_workers.boot_env(env)
        assert workers == Settings.model_fields["letta_workers"].default
        assert workers * (int(server_env["LETTA_PG_POOL_SIZE"]) + int(server_env["LETTA_PG_MAX_OVERFLOW"])) \
            <= int(env[letta_workers.CONNECTIONS_ENV])
        shares += int(env[letta_workers.CONNECTIONS_ENV])
        assert server["healthcheck"]["test"][1:] == ["python3", "/opt/vtuber-letta/letta_workers.py", "check"]
    assert shares + letta_workers.RESERVED_CONNECTIONS <= max_connections
    # The first boot (schema, default organisation) happens once: every other server waits for it.
    first = [name for name, s in servers.items() if "postgres" in (s.get("depends_on") or {})]
    assert len(first) == 1
    for name, server in servers.items():
        if name != first[0]:
            assert server["depends_on"] == {first[0]: {"condition": "service_healthy"}}
    init = {v.split(":")[1]: v.split(":")[0] for v in services["postgres"]["volumes"]}
    sql = Path(init["/docker-entrypoint-initdb.d/vtuber-letta.sql"]).read_text()
    assert "CREATE EXTENSION IF NOT EXISTS vector" in sql


def test_bridge_replicas_share_one_redis_and_the_letta_workers_between_them(config):
    services = config["services"]
    bridges = _bridges(config)
    assert len(bridges) >= 2
    ids = {b["environment"]["VTL_BRIDGE_REPLICA_ID"] for b in bridges.values()}
    assert len(ids) == len(bridges), "two replicas with one id would take each other's heartbeats"
    settings = [Settings(_env_file=None, **b["environment"]) for b in bridges.values()]
    assert {s.redis_address for s in settings} == {("redis", 6379)}
    assert {s.letta_api_url for s in settings} == {"http://letta-lb:8283"}
    # Each replica's concurrency follows its share: together they feed every worker behind nginx.
    workers = sum(int(s["environment"][letta_workers.WORKERS_ENV]) for s in _letta_servers(config).values())
    assert sum(s.letta_workers for s in settings) == workers
    assert all(s.bridge_concurrency == s.bridge_concurrency_per_letta_worker * s.letta_workers for s in settings)
    for bridge in bridges.values():
        assert bridge["depends_on"]["provision"] == {"condition": "service_completed_successfully"}
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_nginx_balances_exactly_the_letta_servers(config):
    upstreams = re.findall(r"^\s*server (\S+?):(\d+)", NGINX_CONF.read_text(), flags=re.M)
    assert sorted(host for host, _ in upstreams) == sorted(_letta_servers(config))
    assert {port for _, port in upstreams} == {"8283"}
    lb = config["services"]["letta-lb"]
    assert f"{NGINX_CONF}:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    conf = NGINX_CONF.read_text()
    [retry] = re.findall(r"^\s*proxy_next_upstream (.*);", conf, flags=re.M)
    assert "non_idempotent" not in retry, "nginx must never pass a message send on to a second server"
    assert "proxy_buffering off;" in conf  # token streams as they come


# --------------------------------------------------------------------------- a real nginx

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


class _Upstream:
    """A stand-in Letta server: GET / answers its name; GET /stream sends 'a', waits, then 'b'."""

    def __init__(self, name: str):
        self.name = name
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for part, pause in ((b"data: a\n\n", 1.5), (b"data: b\n\n", 0)):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                        self.wfile.flush()
                        time.sleep(pause)
                    self.wfile.write(b"0\r\n\r\n")
                    return
                body = upstream.name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _local_conf(tmp_path: Path, upstreams: list[_Upstream], port: int) -> Path:
    """The committed configuration with the servers' names and the port made local."""
    conf = NGINX_CONF.read_text().replace("listen 8283;", f"listen 127.0.0.1:{port};")
    names = re.findall(r"^\s*server (\S+?):8283", conf, flags=re.M)
    for name, upstream in zip(names, upstreams):
        conf = conf.replace(f"server {name}:8283", f"server 127.0.0.1:{upstream.port}")
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    return path


def _nginx(tmp_path: Path, conf: Path, *extra: str) -> list[str]:
    return [NGINX, "-p", str(tmp_path), "-c", str(conf), "-g",
            f"pid {tmp_path}/nginx.pid; error_log stderr;{' '.join(extra)}"]


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (as root: apt-get install nginx-light)")
def test_a_real_nginx_takes_the_configuration_shares_requests_and_streams(tmp_path):
    upstreams = [_Upstream("letta-a"), _Upstream("letta-b")]
    port = free_port()
    conf = _local_conf(tmp_path, upstreams, port)
    try:
        checked = subprocess.run([*_nginx(tmp_path, conf), "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        proc = subprocess.Popen(_nginx(tmp_path, conf, " daemon off;"), stderr=subprocess.PIPE)
        try:
            assert wait_until(lambda: port_open("127.0.0.1", port), 10), "nginx did not start"
            answered = {_get(f"http://127.0.0.1:{port}/") for _ in range(10)}
            assert answered == {"letta-a", "letta-b"}
            # The first event arrives while the server is still writing: nothing is buffered.
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stream", timeout=10) as stream:
                started = time.monotonic()
                assert stream.readline() == b"data: a\n"
                assert time.monotonic() - started < 1.0
                assert stream.read().strip() == b"data: b"
        finally:
            proc.terminate()
            proc.wait(10)
            proc.stderr.close()
    finally:
        for upstream in upstreams:
            upstream.close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_make_install_installs_nginx():
    install = re.search(r"^install:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), flags=re.M)
    assert install and "nginx-light" in install.group(1), "the Makefile's install target must install nginx"
