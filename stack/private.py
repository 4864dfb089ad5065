"""A private stack: a second local stack beside a developer's, for the tests and the benchmarks.

It has its own data dir and free loopback ports, shares only the installed Letta server venv, and
ignores whatever the developer's shell or `.env` says (no real model, no other Redis): what runs
against it is exactly what the caller asked for.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from stack.processes import free_port
from vtuber_letta.private_files import TRAVERSE_ONLY
from vtuber_letta.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
# Whatever the developer's shell holds must not reach a child process pointed at a private stack.
FOREIGN_ENV_PREFIXES = ("OPENAI_", "OLLAMA_", "LETTA_", "REDIS_", "VTL_")


def private_data_dir(prefix: str = "vtl-stack-") -> Path:
    """A fresh data dir that Postgres' unprivileged user can pass through to its pgdata, and nobody
    else can list (mkdtemp makes it 0700; 0711)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(TRAVERSE_ONLY)
    return path


def private_stack_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings of a private stack in data_dir on free loopback ports, scripted model, a generated
    Redis password, no `.env`."""
    values: dict[str, Any] = dict(
        letta_api_url=f"http://127.0.0.1:{free_port()}",
        letta_api_key=None,
        letta_model=None,
        redis_url=None,
        redis_host="127.0.0.1",
        redis_port=free_port(),
        # A private stack's Redis requires a password, as every deployment's should: what runs
        # against it gets the password the way a real client does (child_env).
        redis_password=secrets.token_urlsafe(24),
        openai_api_key=None,
        openai_base_url=None,
        ollama_base_url=None,
        data_dir=data_dir,
        letta_server_home=Path(os.environ.get("VTL_LETTA_SERVER_HOME", REPO_ROOT / ".letta-server")),
        postgres_port=free_port(),
        scripted_model_port=free_port(),
        memory_gate_url=f"http://127.0.0.1:{free_port()}",
        console_port=free_port(),
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


def child_env(settings: Settings, **knobs: Any) -> dict[str, str]:
    """The environment of a child process (a bridge, `say`, ...) that must build the same Settings:
    the caller's environment without any foreign LETTA_/REDIS_/VTL_/model variable, plus the
    stack's addresses and password, plus `knobs` (booleans as true/false; None leaves it out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV_PREFIXES)}
    host, port = settings.redis_address
    persona = settings.persona_config if settings.persona_config.is_absolute() else REPO_ROOT / settings.persona_config
    env.update({
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        "LETTA_API_URL": settings.letta_api_url,
        "LETTA_API_KEY": settings.letta_password,
        "LETTA_TIMEOUT": str(settings.letta_timeout),
        "REDIS_HOST": host,
        "REDIS_PORT": str(port),
        "VTL_DATA_DIR": str(settings.data_dir.resolve()),
        "VTL_LETTA_SERVER_HOME": str(settings.letta_server_home.resolve()),
        "VTL_POSTGRES_PORT": str(settings.postgres_port),
        "VTL_SCRIPTED_MODEL_PORT": str(settings.scripted_model_port),
        "VTL_MEMORY_GATE_URL": settings.memory_gate_url,
        "VTL_CONSOLE_PORT": str(settings.console_port),
        "VTL_TEMPLATE": settings.template_name,
        "VTL_PERSONA_CONFIG": str(persona),
    })
    if settings.redis_secret:
        env["REDIS_PASSWORD"] = settings.redis_secret
    env.update(env_values(knobs))
    return env


def env_values(knobs: dict[str, Any]) -> dict[str, str]:
    """Settings as environment variables: booleans as true/false, None left out."""
    return {name: ("true" if value else "false") if isinstance(value, bool) else str(value)
            for name, value in knobs.items() if value is not None}
