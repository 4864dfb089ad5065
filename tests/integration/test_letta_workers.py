"""Issue 18: the real local stack with two Letta workers, one of them SIGKILLed while viewers talk.

This module runs a stack of its own (VTL_LETTA_WORKERS=2) instead of the session's: the other
modules keep the default worker count."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack import letta_workers
from stack.manager import Stack
from stack.private import private_data_dir, private_stack_settings
from tests.integration.bridge_helpers import (
    agents_of,
    clear_bridge_state,
    dead_letters,
    memory_queue,
    otid_count,
    push,
    redis_conn,
    run_id,
    tts_replies,
    user_otid_counts,
    wait_for,
    wait_for_replies,
)
from vtuber_letta.commands.say import build_task

WORKERS = 2
REPLY = "好的，我记住啦。"


@pytest.fixture(scope="module")
def stack_settings():
    data_dir = private_data_dir()
    yield private_stack_settings(data_dir, letta_workers=WORKERS)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(stack_settings):
    running = Stack(stack_settings, log=lambda msg: print(f"[stack] {msg}"))
    try:
        started = time.monotonic()
        running.up()
        print(f"stack up with {WORKERS} Letta workers (first boot) in {time.monotonic() - started:.0f} s")
        yield running
    finally:
        running.down()


@pytest.fixture
def r(stack, stack_settings):
    conn = redis_conn(stack_settings)
    clear_bridge_state(conn)
    yield conn
    conn.close()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def root_child(root: int) -> int:
    """uvicorn's parent: the one child of the line filter (the workers' boot exec'd into it)."""
    [child] = [int(p) for p in Path(f"/proc/{root}/task/{root}/children").read_text().split()]
    return child


def _letta_status(stack: Stack):
    return next(s for s in stack.status() if s.name == "letta")


def test_two_workers_boot_after_one_alone_with_one_password_and_pools_that_fit(stack, stack_settings):
    root = stack.letta.process.pid()
    workers = letta_workers.worker_pids(root)
    assert len(workers) == WORKERS
    status = _letta_status(stack)
    assert status.state == "healthy" and f"{WORKERS} workers" in status.detail, status
    log = stack.letta.process.log_file.read_text()
    assert f"one worker booted; starting {WORKERS}" in log
    assert stack_settings.letta_password not in log  # the line filter still blanks it
    max_connections = stack.postgres.max_connections()
    for pid in workers:
        env = _environ(pid)
        assert env["LETTA_UVICORN_WORKERS"] == str(WORKERS)
        assert env["LETTA_SERVER_PASSWORD"] == stack_settings.letta_password  # one password for all
        # Every model call and embedding builds an SSL context: from the system's CA directory,
        # not certifi's bundle parsed whole (stack/letta_workers.py ca_store_env).
        assert env.get("SSL_CERT_DIR") == str(letta_workers.SYSTEM_CERTS_DIR), env.get("SSL_CERT_DIR")
        pool, overflow = int(env["LETTA_PG_POOL_SIZE"]), int(env["LETTA_PG_MAX_OVERFLOW"])
    assert WORKERS * (pool + overflow) <= max_connections - letta_workers.RESERVED_CONNECTIONS
    assert (pool, overflow) == (letta_workers.POOL_SIZE, letta_workers.MAX_OVERFLOW)
    print("RSS per worker: " + ", ".join(f"{_rss_mib(pid):.0f} MiB" for pid in workers)
          + f"; uvicorn's parent {_rss_mib(root_child(root)):.0f} MiB")


def test_a_killed_worker_is_seen_within_10_s_and_no_task_is_lost(stack, stack_settings, provisioned, scripted, r,
                                                                  bridges, client):
    rid = run_id()
    # Slow turns, so that some are in flight on the worker that dies.
    scripted.set_rules({"name": "slow-plain", "when": {}, "then": {"reply": REPLY, "delay_ms": 1500}})
    bridge = bridges()
    viewers = [f"it:worker-{rid}-{i}" for i in range(6)]
    before = [build_task(v, f"first {v}") for v in viewers]
    push(r, before)
    wait_for(lambda: scripted.stats()["chat_requests"] >= 3, 60, what="turns in flight")

    root = stack.letta.process.pid()
    victim = letta_workers.worker_pids(root)[0]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    status = wait_for(lambda: (s := _letta_status(stack)).state != "healthy" and s, 10, interval=0.5,
                      what="stack status to notice the dead worker")
    noticed = time.monotonic() - killed
    print(f"stack status noticed the dead worker after {noticed:.1f} s: {status.detail}")
    assert status.state == "unhealthy" and f"1 of {WORKERS} workers alive" in status.detail, status
    # The compose healthcheck's command sees it too.
    check = subprocess.run([sys.executable, letta_workers.__file__, "check", "--root", str(root)],
                           env={"PATH": "/usr/bin:/bin", letta_workers.WORKERS_ENV: str(WORKERS),
                                letta_workers.HEALTH_URL_ENV: f"{stack_settings.letta_api_url}/v1/health/"},
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and f"1 of {WORKERS} Letta workers alive" in check.stderr, check.stderr

    during = [build_task(v, f"second {v}") for v in viewers]  # sent while Letta runs on one worker
    push(r, during)
    tasks = before + during
    wait_for_replies(r, [t["task_id"] for t in tasks], 180, bridge)
    retried = bridge.log_text().count("retrying task")
    print(f"all {len(tasks)} tasks answered; the bridge retried {retried} attempt(s)")
    assert not dead_letters(r) and not memory_queue(r), "a task went to the dead letters or the fallback"
    assert {reply["text"] for reply in tts_replies(r)} == {REPLY}
    for viewer in viewers:  # each task exactly once in its viewer's history: none lost, none doubled
        [agent] = agents_of(client, viewer)
        counts = user_otid_counts(client, agent.id)
        assert [otid_count(counts, t["task_id"]) for t in tasks if t["user_id"] == viewer] == [1, 1]

    # `stack up` makes Letta whole again (a restart with every worker).
    started = time.monotonic()
    stack.up()
    print(f"`stack up` restarted Letta with {WORKERS} workers in {time.monotonic() - started:.0f} s")
    assert len(letta_workers.worker_pids(stack.letta.process.pid())) == WORKERS
    assert _letta_status(stack).state == "healthy"
