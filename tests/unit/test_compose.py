"""Issue: the compose files. They validate against the Compose specification (with Debian's
`docker-compose`, whose `config` parses, interpolates, merges and schema-checks without a Docker
engine), and everything in them is what the code uses: the Letta image tag is the version the
stack installs, every ${VARIABLE} and every .env.example key is one vtuber-letta (or, for the letta
container, the Letta server) reads, every service and volume is used, the healthchecks are there
and the bridge gets longer to stop than it takes to finish its turns. And the secrets: Redis
requires a password every service sends (never on a command line), and Letta runs under the line
filter that keeps its password out of `docker logs`."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import redis
import yaml

from stack import letta_workers
from stack.install import LETTA_VERSION
from stack.processes import free_port, wait_until
from stack.redacting_runner import REDACT_ENV
from tools.memory_client import GATE_URL_ENV
from vtuber_letta.commands.cli import build_parser
from vtuber_letta.settings import Settings

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "docker-compose.yml"
DEV = REPO / "docker-compose.dev.yml"
ENV_EXAMPLE = REPO / ".env.example"
VALIDATOR = "docker-compose"
INSTALL_HINT = ("the compose validator `docker-compose` is not installed: `make install` installs it "
                "(as root: apt-get install --no-install-recommends docker-compose)")

SETTINGS_VARIABLES = {field.alias for field in Settings.model_fields.values() if field.alias}
# Variables of the letta container that the Letta server 0.16.8 reads, and where (in its sdist).
LETTA_SERVER_VARIABLES = {
    "LETTA_SERVER_SECURE": ("letta/server/rest_api/app.py", 'os.getenv("LETTA_SERVER_SECURE")'),
    "LETTA_SERVER_PASSWORD": ("letta/server/rest_api/app.py", 'os.getenv("LETTA_SERVER_PASSWORD")'),
    "LETTA_TRACK_PROVIDER_TRACE": ("letta/settings.py", "    track_provider_trace: bool"),  # env_prefix letta_
    "LETTA_DEBUG": ("letta/settings.py", "    debug: Optional[bool]"),  # env_prefix letta_
    "OPENAI_API_KEY": ("letta/settings.py", "    openai_api_key: Optional[str]"),
    "OPENAI_BASE_URL": ("letta/settings.py", 'AliasChoices("OPENAI_BASE_URL"'),
    "OLLAMA_BASE_URL": ("letta/settings.py", "    ollama_base_url: Optional[str]"),
    # docker-compose.scale-out.yml: the shared Postgres (its password builds the URI) and Redis.
    "LETTA_PG_URI": ("letta/settings.py", "    pg_uri: Optional[str]"),
    "LETTA_PG_PASSWORD": ("letta/settings.py", "    pg_password: Optional[str]"),
    "LETTA_DISABLE_SQLALCHEMY_POOLING": ("letta/settings.py", "    disable_sqlalchemy_pooling: bool"),
    "LETTA_REDIS_HOST": ("letta/settings.py", "    redis_host: Optional[str]"),
    # Set in stack/letta.Dockerfile (ToolSettings has no env prefix): our slim tool sandbox.
    "TOOL_EXEC_DIR": ("letta/settings.py", "    tool_exec_dir: Optional[str]"),
    "TOOL_EXEC_VENV_NAME": ("letta/settings.py", "    tool_exec_venv_name: Optional[str]"),
    "TOOL_EXEC_AUTORELOAD_VENV": ("letta/settings.py", "    tool_exec_autoreload_venv: bool"),
}
LETTA_DOCKERFILE = REPO / "stack" / "letta.Dockerfile"
# Read by the Python interpreter of our image, not by our settings.
PYTHON_VARIABLES = {"PYTHONPATH"}
# Read in the letta container by our line filter that keeps the password out of `docker logs`.
RUNNER = "/opt/vtuber-letta/redacting_runner.py"
# ... and by the boot of its uvicorn workers, which is also its healthcheck (stack/letta_workers.py).
WORKERS_SCRIPT = "/opt/vtuber-letta/letta_workers.py"
# What the letta/letta image keeps where (pgvector base image's PGDATA; Letta's LETTA_DIR and its
# logs), and the line filter Letta runs under.
LETTA_MOUNTS = {"/var/lib/postgresql/data": "data/letta/pgdata", "/root/.letta": "data/letta/config",
                "/root/.letta/logs": "data/letta/logs", RUNNER: "stack/redacting_runner.py",
                WORKERS_SCRIPT: "stack/letta_workers.py"}


# --------------------------------------------------------------------------- the validator

def run_validator(*files: Path, env_file: Path = ENV_EXAMPLE, cwd: Path = REPO) -> subprocess.CompletedProcess:
    if shutil.which(VALIDATOR) is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    argv = [VALIDATOR, "--env-file", str(env_file)]
    for path in files:
        argv += ["-f", str(path)]
    # A clean environment: only the env file feeds the interpolation (never a developer's .env or shell).
    return subprocess.run([*argv, "config"], cwd=cwd, env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd)},
                          capture_output=True, text=True, timeout=60)


def rendered(*files: Path) -> dict:
    done = run_validator(*files)
    assert done.returncode == 0, f"{VALIDATOR} rejects {[f.name for f in files]}:\n{done.stderr}"
    assert "variable is not set" not in done.stderr, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def base() -> dict:
    return rendered(BASE)


@pytest.fixture(scope="module")
def merged() -> dict:
    return rendered(BASE, DEV)


@pytest.fixture(scope="module", params=["base", "base+dev"])
def config(request, base, merged) -> dict:
    return base if request.param == "base" else merged


def test_the_validator_schema_checks(tmp_path):
    """A misspelt key must fail, or a passing validation would mean nothing."""
    broken = tmp_path / "broken.yml"
    broken.write_text(BASE.read_text().replace("stop_grace_period:", "stop_grace_periodd:"))
    done = run_validator(broken, cwd=REPO)
    assert done.returncode != 0 and "stop_grace_periodd" in done.stderr, done.stderr


@pytest.mark.parametrize("variable", ["LETTA_API_KEY", "LETTA_MODEL", "REDIS_PASSWORD", "VTL_CONSOLE_PASSWORD"])
def test_required_variables_stop_compose_with_a_message(tmp_path, variable):
    """Each required variable, missing or empty, stops compose with a message naming it."""
    for missing in ("", f"{variable}=\n"):
        env = tmp_path / "partial.env"
        env.write_text("".join(line + "\n" for line in ENV_EXAMPLE.read_text().splitlines()
                               if not line.startswith(f"{variable}=")) + missing)
        done = run_validator(BASE, env_file=env)
        assert done.returncode != 0 and f"set {variable} in .env" in done.stderr, done.stderr


# --------------------------------------------------------------------------- images and variables

def test_letta_image_is_the_version_the_stack_installs(config):
    letta = config["services"]["letta"]
    assert Path(letta["build"]["context"]) / letta["build"]["dockerfile"] == LETTA_DOCKERFILE
    dockerfile = LETTA_DOCKERFILE.read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, flags=re.M) == [f"letta/letta:{LETTA_VERSION}"]
    assert letta["image"].endswith(f":{LETTA_VERSION}")
    assert config["services"]["redis"]["image"].split(":")[1].split(".")[0] == "7"


def test_the_letta_image_runs_tools_in_the_slim_sandbox_the_local_stack_builds():
    from stack.tool_sandbox import server_env

    dockerfile = LETTA_DOCKERFILE.read_text()
    assert "COPY stack/tool_sandbox.py " in dockerfile and "tool_sandbox.py /opt/vtl-tool-sandbox" in dockerfile
    declared = dict(re.findall(r"(TOOL_EXEC_[A-Z_]+)=(\S+)", dockerfile))
    assert declared == {k: v for k, v in server_env(Path("/opt/vtl-tool-sandbox")).items()}


def _interpolated(path: Path) -> set[str]:
    """Every ${VARIABLE} in the file's keys and values (comments are not interpolated)."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, str):
            found.update(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", node))

    walk(yaml.safe_load(path.read_text()))
    return found


@pytest.mark.parametrize("path", [BASE, DEV], ids=lambda p: p.name)
def test_every_interpolated_variable_is_one_the_code_reads(path):
    used = _interpolated(path)
    assert used, f"{path.name} interpolates nothing?"
    unknown = used - SETTINGS_VARIABLES
    assert not unknown, f"{path.name} uses ${{{', '.join(sorted(unknown))}}}, which vtuber_letta.settings never reads"


def test_every_container_variable_is_read_by_its_program(config):
    for name, service in config["services"].items():
        env = set(service.get("environment") or {})
        if name == "letta":
            # GATE_URL_ENV: read by our tools inside Letta's sandbox; REDACT_ENV: by the line filter;
            # WORKERS_ENV: by the workers' boot and healthcheck.
            unknown = env - set(LETTA_SERVER_VARIABLES) - {GATE_URL_ENV, REDACT_ENV, letta_workers.WORKERS_ENV}
            assert not unknown, f"letta gets {sorted(unknown)}: not Letta server variables we know it reads"
        elif name == "redis":
            assert env == {"REDIS_PASSWORD"}, f"redis gets {sorted(env)}: only its password (its command reads it)"
        else:
            unknown = env - SETTINGS_VARIABLES - PYTHON_VARIABLES
            assert not unknown, f"{name} gets {sorted(unknown)}, which vtuber_letta.settings never reads"


def test_the_letta_server_variables_are_read_by_letta_0_16_8():
    sdist = Path(Settings(_env_file=None).letta_server_home)
    sdist = (sdist if sdist.is_absolute() else REPO / sdist) / f"letta-{LETTA_VERSION}"
    if not (sdist / "letta").is_dir():
        pytest.skip(f"the Letta {LETTA_VERSION} sdist is not unpacked at {sdist} (`make install` / "
                    "`vtuber-letta stack install` does it)")
    for variable, (relative, needle) in LETTA_SERVER_VARIABLES.items():
        assert needle in (sdist / relative).read_text(), f"{variable}: {needle!r} not in Letta's {relative}"


def _env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active KEY=value lines, commented `# KEY=value` lines) of .env.example."""
    active, commented = {}, {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            (commented if match.group(1) else active)[match.group(2)] = match.group(3)
    return active, commented


def test_env_example_documents_exactly_the_variables_the_code_reads():
    active, commented = _env_example()
    documented = set(active) | set(commented)
    unknown = documented - SETTINGS_VARIABLES - set(LETTA_SERVER_VARIABLES)
    assert not unknown, f".env.example documents {sorted(unknown)}, which nothing reads"
    missing = SETTINGS_VARIABLES - documented
    assert not missing, f".env.example does not document {sorted(missing)} (vtuber_letta/settings.py reads them)"
    assert not [k for k, v in active.items() if v == ""], "an empty NAME= is an invalid value: comment it out"
    assert _interpolated(BASE) | _interpolated(DEV) <= documented


def test_env_example_is_valid_as_is_and_with_every_line_uncommented(tmp_path):
    active, commented = _env_example()
    as_is = Settings(_env_file=str(ENV_EXAMPLE))
    assert as_is.letta_api_key is not None and as_is.letta_model == active["LETTA_MODEL"]
    everything = tmp_path / "all.env"
    everything.write_text("".join(f"{k}={v}\n" for k, v in {**commented, **active}.items()))
    Settings(_env_file=str(everything))  # raises on any invalid documented value


# --------------------------------------------------------------------------- services, volumes, health

def test_every_service_is_used_and_starts_in_order(config):
    services = config["services"]
    assert set(services) == {"redis", "letta", "memory-gate", "provision", "bridge", "console", "episodes"}
    needed = {dep for s in services.values() for dep in (s.get("depends_on") or {})}
    assert set(services) - needed == {"bridge", "console", "episodes"}, \
        "every service but the bridge, the console and the episode sweep is something another waits for"
    assert services["provision"]["depends_on"] == {"letta": {"condition": "service_healthy"},
                                                   "redis": {"condition": "service_healthy"}}
    assert services["bridge"]["depends_on"]["provision"] == {"condition": "service_completed_successfully"}
    assert services["provision"]["restart"] == "no"
    assert services["console"]["depends_on"]["provision"] == {"condition": "service_completed_successfully"}
    assert services["episodes"]["depends_on"]["provision"] == {"condition": "service_completed_successfully"}


def test_the_commands_are_vtuber_letta_subcommands(config):
    for name in ("provision", "bridge", "memory-gate", "console"):
        command = config["services"][name]["command"]
        args = command[1:] if command[0] == "vtuber-letta" else command[3:]
        assert command[0] == "vtuber-letta" or command[:3] == ["python", "-m", "vtuber_letta.commands.cli"], command
        assert build_parser().parse_args(args).command == name
    # The episode sweep runs as a loop of its own, never inside the bridge.
    sweep = build_parser().parse_args(config["services"]["episodes"]["command"][1:])
    assert (sweep.command, sweep.action, sweep.every) == ("stream", "sweep", 15.0)


def test_every_volume_is_used(config):
    for name in config.get("volumes") or {}:
        users = [s for s, svc in config["services"].items()
                 if any(str(v).split(":")[0] == name for v in svc.get("volumes") or [])]
        assert users, f"named volume {name} is used by no service"
    services = config["services"]
    letta = {v.split(":")[1]: v.split(":")[0] for v in services["letta"]["volumes"]}
    assert {target: str(Path(source).relative_to(REPO)) for target, source in letta.items()} == LETTA_MOUNTS
    assert [v.split(":")[:2] for v in services["redis"]["volumes"]] == [[str(REPO / "data/redis"), "/data"]]
    for name in ("provision", "bridge", "console"):
        service = services[name]
        targets = {v.split(":")[1]: v for v in service["volumes"]}
        env = service["environment"]
        assert str(Path(env["VTL_PERSONA_CONFIG"]).parent) in targets, f"{name}: the persona config is not mounted"
        reads = {str(Path(env["VTL_PERSONA_CONFIG"]).parent), env.get("VTL_BRIDGE_UPLOADS_DIR"),
                 service.get("working_dir")}
        unused = set(targets) - reads
        assert not unused, f"{name} mounts {sorted(unused)}, which it never reads"


def test_redis_persists_and_everything_has_a_healthcheck(config):
    services = config["services"]
    assert "--appendonly yes" in services["redis"]["command"][-1]
    for name in ("redis", "letta", "memory-gate", "bridge"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert services["bridge"]["healthcheck"]["test"][1:] == ["vtuber-letta", "bridge", "--check"]
    assert services["letta"]["healthcheck"]["test"][1:] == ["python3", WORKERS_SCRIPT, "check"]
    assert services["letta"]["environment"]["LETTA_SERVER_SECURE"] == "true"
    assert services["letta"]["environment"]["LETTA_SERVER_PASSWORD"] == _env_example()[0]["LETTA_API_KEY"]


# --------------------------------------------------------------------------- secrets

def test_redis_requires_the_password_every_service_sends(config):
    services = config["services"]
    password = _env_example()[0]["REDIS_PASSWORD"]
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == password
    script = services["redis"]["command"][-1]
    assert "requirepass $$REDIS_PASSWORD" in script, "redis-server must be given the password"
    assert password not in " ".join(services["redis"]["command"]), "the password must not be on a command line"
    for name in ("provision", "bridge"):
        settings = Settings(_env_file=None, **services[name]["environment"])
        assert settings.redis_secret == password, f"{name} does not send the Redis password"
        assert settings.redis_address == ("redis", 6379)
    health = " ".join(services["redis"]["healthcheck"]["test"])
    assert "REDISCLI_AUTH=" in health and password not in health and "PONG" in health


def test_the_redis_command_starts_redis_with_the_password_from_stdin_only(tmp_path):
    """The compose command, run here with Debian's redis-server (the image's entrypoint stubbed):
    Redis then refuses clients without the password, and a password it cannot take is refused by
    name without being printed."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed (`make install` installs it)")
    stub = tmp_path / "bin" / "docker-entrypoint.sh"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nexec "$@"\n')
    stub.chmod(0o755)
    port, data = free_port(), tmp_path / "data"
    data.mkdir()
    script = (yaml.safe_load(BASE.read_text())["services"]["redis"]["command"][-1].replace("$$", "$")
              .replace("--dir /data", f"--dir {data} --bind 127.0.0.1 --port {port}"))
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin", "REDIS_PASSWORD": "a-good_password.1~"}
    server = subprocess.Popen(["sh", "-ec", script], env=env, stdout=subprocess.DEVNULL)
    try:
        authed = redis.Redis(port=port, password=env["REDIS_PASSWORD"], socket_timeout=2)
        assert wait_until(lambda: _pings(authed), 20), "redis did not start"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
        assert env["REDIS_PASSWORD"].encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
    finally:
        server.terminate()
        assert server.wait(20) == 0  # SIGTERM reaches redis-server itself (the shell exec'd it)
    assert not [p for p in data.rglob("*") if p.stat().st_mode & 0o077], "redis files must be private"
    bad = subprocess.run(["sh", "-ec", script], env={**env, "REDIS_PASSWORD": "has a space"},
                         capture_output=True, text=True, timeout=20)
    assert bad.returncode != 0 and "REDIS_PASSWORD: use only" in bad.stderr and "has a space" not in bad.stderr


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def test_letta_runs_under_the_line_filter_that_blanks_its_password(config):
    letta = config["services"]["letta"]
    # The image's own CMD, its workers booted one first, filtered.
    assert letta["command"][1:] == [RUNNER, "python3", WORKERS_SCRIPT, "boot", "--", "./letta/server/startup.sh"]
    assert letta["environment"][REDACT_ENV] == letta["environment"]["LETTA_SERVER_PASSWORD"]


def test_the_letta_images_startup_is_what_the_filter_runs():
    sdist = Path(Settings(_env_file=None).letta_server_home)
    sdist = (sdist if sdist.is_absolute() else REPO / sdist) / f"letta-{LETTA_VERSION}"
    if not (sdist / "Dockerfile").is_file():
        pytest.skip(f"the Letta {LETTA_VERSION} sdist is not unpacked at {sdist}")
    dockerfile = (sdist / "Dockerfile").read_text()
    assert 'CMD ["./letta/server/startup.sh"]' in dockerfile and "python3" in dockerfile
    assert 'print(f"▶ Using secure mode with password: {random_password}")' in (
        sdist / "letta/server/rest_api/app.py").read_text(), "Letta no longer prints it: the filter may be dropped"


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    return sum(float(n) * units[u] for n, u in parts)


def test_the_bridge_may_finish_its_turns_before_it_is_killed(config):
    bridge = config["services"]["bridge"]
    stop = _seconds(bridge["stop_grace_period"])
    default = Settings.model_fields["bridge_grace_period"].default
    assert stop > default, f"stop_grace_period {stop} s <= VTL_BRIDGE_GRACE_PERIOD default {default} s"
    assert stop > float(bridge["environment"]["VTL_BRIDGE_GRACE_PERIOD"])


def test_published_ports_are_loopback_only(config):
    for name, service in config["services"].items():
        for port in service.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


# --------------------------------------------------------------------------- the image

def test_the_image_holds_every_package_and_a_python_the_project_accepts():
    dockerfile = (REPO / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, flags=re.M))
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"
    python = re.search(r"^FROM python:(\d+)\.(\d+)", dockerfile, flags=re.M)
    minimum = re.match(r">=(\d+)\.(\d+)", project["project"]["requires-python"])
    assert python and minimum and tuple(map(int, python.groups())) >= tuple(map(int, minimum.groups()))


def test_make_install_installs_the_validator():
    install = re.search(r"^install:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), flags=re.M)
    assert install and VALIDATOR in install.group(1), "the Makefile's install target must install docker-compose"


def test_letta_and_the_bridge_get_the_one_default_worker_count(config):
    """The worker count's default lives in vtuber_letta/settings.py; compose's fallback must be it,
    and the bridge, whose concurrency follows it, must be told the same count as Letta."""
    services = config["services"]
    default = Settings.model_fields["letta_workers"].default
    assert services["letta"]["environment"][letta_workers.WORKERS_ENV] == str(default)
    assert services["bridge"]["environment"][letta_workers.WORKERS_ENV] == str(default)
    assert f"${{{letta_workers.WORKERS_ENV}:-{default}}}" in BASE.read_text()
