"""Security defaults of the real stack, after it has served a turn: no password (Letta's, Postgres',
Redis') in any log or other file the stack writes, nor on any of its command lines, and nothing it
wrote readable by other users of the machine."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from stack.processes import process_tree
from stack.redis_server import config_quoted
from tests.integration.bridge_helpers import BridgeProcess, clear_bridge_state, push, redis_conn, wait_for_replies
from vtuber_letta.commands.say import build_task

pytestmark = pytest.mark.integration

# The files whose whole job is to hold a password (0600, checked below): nowhere else may one appear.
# Letta 0.16.8 itself saves its database URI (with the Postgres password) in ~/.letta/config.
PASSWORD_FILES = {"letta/config/server-password", "letta/config/postgres-password", "redis/auth.conf",
                  "letta/config/.letta/config"}
# What a secure-mode Letta prints at start, once our line filter has had it.
REDACTED_BANNER = "Using secure mode with password: [redacted]"


@pytest.fixture(scope="module")
def served(stack, provisioned, bridges_module):
    """The session stack after one bridge turn (Letta, Postgres, Redis and the model all logged)."""
    r = redis_conn(provisioned)
    clear_bridge_state(r)
    bridge = bridges_module()
    pushed = push(r, [build_task("it:security-viewer", "hello, do you remember me?", display_name="Sec")])
    task_id = json.loads(pushed[0])["task_id"]
    assert wait_for_replies(r, [task_id], 120, bridge), bridge.log_tail()
    assert bridge.stop() == 0, bridge.log_tail()
    clear_bridge_state(r)
    r.close()
    return stack, bridge


@pytest.fixture(scope="module")
def bridges_module(provisioned, tmp_path_factory):
    """conftest's `bridges`, for a module-scoped fixture."""
    started: list[BridgeProcess] = []

    def start(**knobs):
        bridge = BridgeProcess(provisioned, tmp_path_factory.mktemp("security-bridge"), **knobs)
        started.append(bridge)
        return bridge.start()

    yield start
    for bridge in started:
        if bridge.alive:
            bridge.kill()


@pytest.fixture(scope="module")
def passwords(stack_settings) -> dict[str, str]:
    pg = (stack_settings.data_dir / "letta" / "config" / "postgres-password").read_text().strip()
    found = {"Letta server password": stack_settings.letta_password, "Postgres password": pg,
             "Redis password": stack_settings.redis_secret or ""}
    assert all(len(value) >= 16 for value in found.values()), "every part of the test stack must have a password"
    return found


def _stack_files(data: Path) -> list[Path]:
    return sorted(path for folder in (data / "letta", data / "redis") for path in folder.rglob("*")
                  if path.is_file() and not path.is_symlink())


def test_no_password_in_any_log_or_file_of_the_stack(served, stack_settings, passwords):
    stack, bridge = served
    data = stack_settings.data_dir.resolve()
    files = _stack_files(data)
    logs = {str(p.relative_to(data)) for p in files if ".log" in p.name}
    expected = {"letta/logs/letta-server.log", "letta/logs/postgres.log", "letta/logs/scripted-model.log",
                "redis/redis.log", "letta/config/logs/Letta.log"}
    assert expected <= logs, f"missing logs: {sorted(expected - logs)} (found {sorted(logs)})"
    assert REDACTED_BANNER in (data / "letta/logs/letta-server.log").read_text(errors="replace"), \
        "Letta's password banner is not in its log: this test would not see it leak"
    leaks = []
    for path in [*files, bridge.log_path]:
        if path.is_relative_to(data) and str(path.relative_to(data)) in PASSWORD_FILES:
            continue
        content = path.read_bytes()
        leaks += [f"{name} in {path}" for name, value in passwords.items() if value.encode() in content]
    assert leaks == []


def test_each_password_file_holds_its_password_and_is_private(stack_settings, passwords):
    data = stack_settings.data_dir
    for relative in PASSWORD_FILES:
        path = data / relative
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, relative
    assert (data / "letta/config/server-password").read_text().strip() == passwords["Letta server password"]
    assert passwords["Postgres password"] in (data / "letta/config/.letta/config").read_text()
    assert (data / "redis/auth.conf").read_text() == f"requirepass {config_quoted(passwords['Redis password'])}\n"


def test_no_password_on_any_command_line_of_the_stack(served, passwords):
    stack, _bridge = served
    leaders = [part.process.pid() for part in (stack.redis, stack.postgres, stack.model, stack.letta) if part]
    pids = [pid for leader in leaders if leader for pid in process_tree(leader)]
    assert len(pids) >= 4
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        found += [f"{name} on the command line of {pid}" for name, value in passwords.items() if value.encode() in cmdline]
    assert found == []


def test_nothing_the_stack_wrote_is_readable_by_other_users(served, stack_settings):
    data = stack_settings.data_dir.resolve()
    assert stat.S_IMODE(data.stat().st_mode) & 0o044 == 0, "the data dir itself is listable by others"
    exposed = []
    for top in (data / "letta", data / "redis"):
        for path in [top, *top.rglob("*")]:
            info = path.lstat()
            relative = path.relative_to(data)
            if stat.S_ISLNK(info.st_mode) or stat.S_ISSOCK(info.st_mode):
                continue  # a link has no mode of its own; Postgres' socket sits in its 0700 pgdata
            allowed = 0o011 if path == data / "letta" else 0  # Postgres' user passes through it to pgdata
            if stat.S_IMODE(info.st_mode) & 0o077 & ~allowed:
                exposed.append(f"{relative} {oct(stat.S_IMODE(info.st_mode))}")
    assert exposed == [], "\n".join(exposed)
    assert len(list((data / "redis").rglob("*.aof"))) >= 1, "redis wrote no append-only file to check"
    assert (data / "letta" / "pgdata" / "PG_VERSION").exists()
    assert os.stat(data / "letta" / "config" / "logs" / "Letta.log").st_size > 0
