"""The integration tier: one real local stack per test session, on free loopback ports.

It is a second stack beside any developer's (its own data dir and ports), shares
only the installed Letta server venv, and is stopped at the end; the session
fails if any of its processes is still alive afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from provisioning.provision import provision
from stack.manager import Stack
from tests.integration.bridge_helpers import BridgeProcess
from tests.integration.scripted import ScriptedModel
from vtuber_letta.letta_api import letta_client
from stack.processes import free_port
from vtuber_letta.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_stack_settings(data_dir: Path, **overrides) -> Settings:
    values = dict(
        letta_api_url=f"http://127.0.0.1:{free_port()}",
        letta_api_key=None,
        letta_model=None,
        redis_url=None,
        redis_host="127.0.0.1",
        redis_port=free_port(),
        openai_api_key=None,
        openai_base_url=None,
        ollama_base_url=None,
        data_dir=data_dir,
        letta_server_home=Path(os.environ.get("VTL_LETTA_SERVER_HOME", REPO_ROOT / ".letta-server")),
        postgres_port=free_port(),
        scripted_model_port=free_port(),
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


def stack_data_dir() -> Path:
    """A fresh data dir that Postgres' unprivileged user can reach (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vtl-stack-"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    data_dir = stack_data_dir()
    yield make_stack_settings(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(stack_settings):
    running = Stack(stack_settings, log=lambda msg: print(f"[stack] {msg}"))
    try:
        running.up()
        yield running
    finally:
        running.down()


# The bridge modules' shared fixtures (a module may define its own under the same name).
@pytest.fixture(scope="module")
def provisioned(stack, stack_settings):
    """The session stack with the tools and shared blocks registered (agents can be created)."""
    summary = provision(stack_settings, out=lambda _msg: None)
    assert summary.ok, summary.render()
    return stack_settings


@pytest.fixture(scope="module")
def scripted(stack, stack_settings) -> ScriptedModel:
    return ScriptedModel(stack_settings.scripted_model_port)


@pytest.fixture(scope="module")
def client(provisioned):
    return letta_client(provisioned)


@pytest.fixture
def bridge_defaults() -> dict:
    """Knobs every bridge of a module gets (a module overrides this fixture to change them)."""
    return {}


@pytest.fixture
def bridges(provisioned, tmp_path, bridge_defaults):
    """Factory of bridge subprocesses; whatever a test leaves running is stopped afterwards."""
    started: list[BridgeProcess] = []

    def start(**knobs) -> BridgeProcess:
        bridge = BridgeProcess(provisioned, tmp_path / "bridge-logs", **{**bridge_defaults, **knobs})
        started.append(bridge)
        return bridge.start()

    yield start
    for bridge in started:
        if bridge.alive:
            try:
                bridge.stop(timeout=30)
            except AssertionError:
                bridge.kill()
