"""The integration tier: one real local stack per test session, on free loopback ports.

It is a second stack beside any developer's (its own data dir and ports), shares
only the installed Letta server venv, and is stopped at the end; the session
fails if any of its processes is still alive afterwards.
"""

from __future__ import annotations

import gc
import shutil

import pytest

from provisioning.provision import provision
from stack.manager import Stack
from stack.private import private_data_dir, private_stack_settings
from tests.integration.bridge_helpers import BridgeProcess, clear_bridge_state, redis_conn
from tests.integration.scripted import ScriptedModel
from vtuber_letta.letta_api import letta_client
from vtuber_letta.settings import Settings

# Warnings are errors (pyproject.toml), but here a ResourceWarning raised while garbage is collected
# (a Letta or Redis client a test left to the collector, whichever test is running then) is shown,
# not fatal: this tier's tests hold many clients of a real stack, and the unit tier, which drives the
# same code, keeps the strict rule.
_LEAKS_SHOWN = (pytest.mark.filterwarnings("default::pytest.PytestUnraisableExceptionWarning"),
                pytest.mark.filterwarnings("default::ResourceWarning"))


def pytest_collection_modifyitems(config, items):
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            for mark in _LEAKS_SHOWN:
                item.add_marker(mark)


@pytest.fixture(scope="session", autouse=True)
def _collect_garbage_last():
    """Collect what the session leaves while its last test is still tearing down (so the rule above
    applies), not after the session, where any warning fails the run."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    data_dir = private_data_dir()
    yield private_stack_settings(data_dir)
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


@pytest.fixture
def fresh_rules(scripted):
    """No rule of an earlier test is left on the scripted model, and none of this one after it."""
    scripted.reset()
    yield
    scripted.reset()


@pytest.fixture(scope="module")
def client(provisioned):
    client = letta_client(provisioned)
    yield client
    client.close()


@pytest.fixture
def r(stack, stack_settings):
    """A plain (bytes) client of the stack's Redis (a module may define its own)."""
    conn = redis_conn(stack_settings)
    yield conn
    conn.close()


@pytest.fixture
def clean_bridge(r, scripted):
    """Empty host lists and bridge keys and the scripted model's defaults, before and after a test."""
    clear_bridge_state(r)
    scripted.reset()
    yield
    clear_bridge_state(r)
    scripted.reset()


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
