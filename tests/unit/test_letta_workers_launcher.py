"""stack/letta_workers.py: Letta's uvicorn workers sized to the database, booted one first, counted.

The boot and the count run for real against a stand-in server (tests/unit/fake_letta_server.py):
a loopback HTTP server that answers /v1/health/ like Letta and, asked for more than one worker,
spawns them as uvicorn 0.29 does (multiprocessing spawn children). The Letta server itself is in
tests/integration/test_letta_workers.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack import letta_workers
from stack.letta_workers import WorkersError, boot_env, pool_per_worker, worker_pids
from stack.processes import free_port, wait_until

FAKE_SERVER = Path(__file__).with_name("fake_letta_server.py")
WORKERS_SCRIPT = letta_workers.__file__


# --------------------------------------------------------------------------- sizing

@pytest.mark.parametrize("workers, connections, expected", [
    (1, 190, (40, 10)),  # the local stack's Postgres (max_connections 200): what one worker had before
    (2, 190, (40, 10)),
    (4, 190, (37, 10)),
    (1, 90, (40, 10)),  # the letta image's Postgres (its default max_connections, 100)
    (2, 90, (35, 10)),
    (6, 90, (5, 10)),
])
def test_each_worker_gets_the_measured_pool_where_the_database_allows(workers, connections, expected):
    assert pool_per_worker(workers, connections) == expected


def test_the_workers_never_hold_more_connections_than_they_are_given():
    for connections in range(15, 400):
        for workers in range(1, 17):
            try:
                pool, overflow = pool_per_worker(workers, connections)
            except WorkersError:
                assert connections // workers < letta_workers.MIN_POOL_SIZE + letta_workers.MAX_OVERFLOW
                continue
            assert workers * (pool + overflow) <= connections
            assert letta_workers.MIN_POOL_SIZE <= pool <= letta_workers.POOL_SIZE


def test_too_many_workers_for_the_database_is_refused_with_what_to_change():
    with pytest.raises(WorkersError, match=r"7 Letta workers need at least 105 .* lower VTL_LETTA_WORKERS"):
        pool_per_worker(7, 90)


def test_the_server_environment_carries_the_worker_count_and_the_pools():
    workers, env = boot_env({"VTL_LETTA_WORKERS": "2", "VTL_LETTA_PG_CONNECTIONS": "190", "PATH": "/bin"})
    assert workers == 2
    assert env["LETTA_UVICORN_WORKERS"] == "2" and env["PATH"] == "/bin"
    assert (env["LETTA_PG_POOL_SIZE"], env["LETTA_PG_MAX_OVERFLOW"]) == ("40", "10")
    # No connection budget (the letta image's Postgres, where Letta keeps its default NullPool): no pool.
    assert "LETTA_PG_POOL_SIZE" not in boot_env({"VTL_LETTA_WORKERS": "3"})[1]
    # An operator's own pool size wins.
    assert boot_env({"VTL_LETTA_WORKERS": "2", "VTL_LETTA_PG_CONNECTIONS": "190",
                     "LETTA_PG_POOL_SIZE": "7"})[1]["LETTA_PG_POOL_SIZE"] == "7"


def test_letta_reads_cas_from_the_system_directory_only_where_openssl_can_look_them_up(tmp_path):
    from stack.letta_workers import ca_store_env

    hashed, empty = tmp_path / "hashed", tmp_path / "empty"
    hashed.mkdir()
    empty.mkdir()
    (hashed / "ISRG_Root_X1.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (hashed / "4042bcee.0").symlink_to("ISRG_Root_X1.pem")
    assert ca_store_env({}, hashed) == {"SSL_CERT_DIR": str(hashed)}
    # No <hash>.0 links (or no directory): certifi's bundle stays, or https endpoints would fail to verify.
    assert ca_store_env({}, empty) == {}
    assert ca_store_env({}, tmp_path / "missing") == {}
    # The operator's own store wins.
    assert ca_store_env({"SSL_CERT_FILE": "/etc/corp-ca.pem"}, hashed) == {}
    assert ca_store_env({"SSL_CERT_DIR": "/etc/corp-certs"}, hashed) == {}


def test_the_system_ca_directory_is_taken_on_this_machine_and_parses_no_certificate_up_front():
    """What ca_store_env rests on, checked where it runs (Debian's ca-certificates)."""
    import ssl

    import certifi

    from stack.letta_workers import SYSTEM_CERTS_DIR, boot_env

    env = boot_env({"VTL_LETTA_WORKERS": "1"})[1]
    assert env["SSL_CERT_DIR"] == str(SYSTEM_CERTS_DIR)
    lazy = ssl.create_default_context(capath=env["SSL_CERT_DIR"])
    assert lazy.verify_mode is ssl.CERT_REQUIRED and lazy.cert_store_stats()["x509_ca"] == 0
    # What httpx builds without it, for every client Letta makes: the whole bundle, parsed.
    assert ssl.create_default_context(cafile=certifi.where()).cert_store_stats()["x509_ca"] > 100


@pytest.mark.parametrize("raw", [None, "", "0", "two", "-1"])
def test_a_missing_or_bad_worker_count_is_refused_by_name(raw):
    env = {} if raw is None else {"VTL_LETTA_WORKERS": raw}
    with pytest.raises(WorkersError, match="VTL_LETTA_WORKERS must be a whole number"):
        boot_env(env)


# --------------------------------------------------------------------------- boot and count, for real

@pytest.fixture
def fake_env(tmp_path):
    port = free_port()
    return {"PATH": "/usr/bin:/bin", "FAKE_PORT": str(port), "FAKE_BOOTS": str(tmp_path / "boots.jsonl"),
            letta_workers.HEALTH_URL_ENV: f"http://127.0.0.1:{port}/v1/health/"}


def _boot(env: dict, workers: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKERS_SCRIPT, "boot", "--", sys.executable, str(FAKE_SERVER)],
                            env={**env, letta_workers.WORKERS_ENV: str(workers)}, start_new_session=True)


def _boots(env: dict) -> list[dict]:
    """One dict per boot of the fake server, oldest first, with how it was stopped (if it was)."""
    path = Path(env["FAKE_BOOTS"])
    by_pid: dict[int, dict] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        event = json.loads(line)
        by_pid.setdefault(event["pid"], {}).update(event)
    return list(by_pid.values())


def _check(env: dict, root: int, workers: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKERS_SCRIPT, "check", "--root", str(root)],
                          env={**env, letta_workers.WORKERS_ENV: str(workers)}, capture_output=True, text=True)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    proc.wait(20)


def test_more_workers_boot_after_one_alone_and_a_dead_one_is_noticed(fake_env):
    proc = _boot(fake_env, 2)
    try:
        assert wait_until(lambda: len(worker_pids(proc.pid)) == 2, 30), _boots(fake_env)
        # One worker alone first (stopped gracefully), then the server itself, in the same process, with two.
        boots = _boots(fake_env)
        assert [(b["workers"], b["pid"] == proc.pid) for b in boots] == [(1, False), (2, True)], boots
        assert boots[0]["stopped_by"] == "SIGTERM"
        assert _check(fake_env, proc.pid, 2).returncode == 0
        assert letta_workers.alive_workers(proc.pid, 2) == 2
        os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
        assert wait_until(lambda: letta_workers.alive_workers(proc.pid, 2) == 1, 5)
        failed = _check(fake_env, proc.pid, 2)
        assert failed.returncode == 1 and "1 of 2 Letta workers alive" in failed.stderr
    finally:
        _stop(proc)


def test_one_worker_boots_once_and_counts_as_alive_while_it_answers(fake_env):
    proc = _boot(fake_env, 1)
    try:
        assert wait_until(lambda: _check(fake_env, proc.pid, 1).returncode == 0, 30)
        assert [(b["workers"], b["pid"] == proc.pid) for b in _boots(fake_env)] == [(1, True)]
        assert worker_pids(proc.pid) == []  # uvicorn spawns none: the server is the worker
    finally:
        _stop(proc)
    down = _check(fake_env, proc.pid, 1)
    assert down.returncode == 1 and "does not answer" in down.stderr


def test_a_stop_during_the_one_worker_boot_does_not_go_on_to_the_others(fake_env):
    proc = _boot({**fake_env, "FAKE_HEALTHY_AFTER_S": "30"}, 2)  # the one worker never gets ready in time
    try:
        assert wait_until(lambda: _boots(fake_env), 15)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # only the boot process: it passes the stop on
        assert proc.wait(20) == 128 + signal.SIGTERM
        assert [b["workers"] for b in _boots(fake_env)] == [1]
        assert wait_until(lambda: "stopped_by" in _boots(fake_env)[0], 5)
    finally:
        _stop(proc)


def test_check_without_a_worker_count_says_so():
    done = subprocess.run([sys.executable, WORKERS_SCRIPT, "check"], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and "VTL_LETTA_WORKERS must be a whole number" in done.stderr
