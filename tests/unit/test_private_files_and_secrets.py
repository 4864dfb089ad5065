"""Security defaults that need no server: the Redis password reaches every client however it is
given, what we write is private (0600 files, 0700 folders, umask 077 for our services), the line
filter blanks secrets, and a `.env` other users can read is pointed out."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from stack.processes import ManagedProcess, free_port, wait_until
from stack.redis_server import config_quoted
from vtuber_letta.commands.cli import warn_if_env_file_is_readable_by_others
from vtuber_letta.private_files import TRAVERSE_ONLY, create_private, make_private, private_dir, write_private
from vtuber_letta.settings import Settings

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "stack" / "redacting_runner.py"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ---------------------------------------------------------------- the Redis password


@pytest.mark.parametrize(
    "env, url, secret",
    [
        ({}, "redis://127.0.0.1:6380/0", None),
        ({"REDIS_PASSWORD": "pw"}, "redis://:pw@127.0.0.1:6380/0", "pw"),
        ({"REDIS_PASSWORD": "a b/c@d%#"}, "redis://:a%20b%2Fc%40d%25%23@127.0.0.1:6380/0", "a b/c@d%#"),
        # docker compose gives the URL and the password separately: the password must still be sent
        ({"REDIS_URL": "redis://redis:6379/0", "REDIS_PASSWORD": "pw"}, "redis://:pw@redis:6379/0", "pw"),
        ({"REDIS_URL": "redis://user@redis:6379/0", "REDIS_PASSWORD": "pw"}, "redis://user:pw@redis:6379/0", "pw"),
        # a password inside the URL wins (e.g. an ACL user's own)
        ({"REDIS_URL": "redis://u:x%2Fy@redis:6379/0", "REDIS_PASSWORD": "pw"}, "redis://u:x%2Fy@redis:6379/0", "x/y"),
        ({"REDIS_URL": "redis://redis:6379/0"}, "redis://redis:6379/0", None),
    ],
)
def test_the_redis_password_reaches_the_client_url(env, url, secret):
    settings = Settings(_env_file=None, **env)
    assert settings.redis_connection_url == url
    assert settings.redis_secret == secret
    if secret:
        assert redis.connection.parse_url(url)["password"] == secret


def test_redis_config_quoting_takes_any_password(tmp_path):
    """The local stack's auth.conf: a password with spaces, quotes and # still works."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    password = 'a "b" c#d \\ e\'f'
    conf = tmp_path / "auth.conf"
    write_private(conf, f"requirepass {config_quoted(password)}\n")
    port = free_port()
    server = subprocess.Popen([binary, str(conf), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=2)
        assert wait_until(lambda: _pings(client), 20)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
    finally:
        server.terminate()
        server.wait(10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


# ---------------------------------------------------------------- private files


def test_write_private_makes_a_0600_file_even_over_a_readable_one(tmp_path):
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o600


def test_write_private_never_follows_a_planted_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    os.symlink(target, tmp_path / "secret")
    with pytest.raises(OSError):
        write_private(tmp_path / "secret", "password")
    assert target.read_text() == "untouched"


def test_create_private_keeps_the_first_value(tmp_path):
    path = tmp_path / "password"
    assert create_private(path, "first") is True
    assert create_private(path, "second") is False
    assert path.read_text() == "first" and mode(path) == 0o600


def test_private_dir_sets_the_mode_of_new_and_existing_folders(tmp_path):
    created = private_dir(tmp_path / "a" / "b")
    assert created == tmp_path / "a" / "b"
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700
    (tmp_path / "open").mkdir(mode=0o755)
    private_dir(tmp_path / "open", TRAVERSE_ONLY)
    assert mode(tmp_path / "open") == 0o711


def test_make_private_takes_group_and_other_bits_off_everything(tmp_path):
    (tmp_path / "logs" / "old").mkdir(parents=True, mode=0o755)
    (tmp_path / "logs" / "Letta.log").write_text("x")
    (tmp_path / "logs" / "Letta.log").chmod(0o644)
    (tmp_path / "logs" / "run.sh").write_text("x")
    (tmp_path / "logs" / "run.sh").chmod(0o755)
    os.symlink("/etc/passwd", tmp_path / "logs" / "link")
    make_private(tmp_path / "logs")
    assert mode(tmp_path / "logs") == 0o700 and mode(tmp_path / "logs" / "old") == 0o700
    assert mode(tmp_path / "logs" / "Letta.log") == 0o600 and mode(tmp_path / "logs" / "run.sh") == 0o700
    assert stat.S_IMODE(os.stat("/etc/passwd").st_mode) == 0o644  # a link's target is never touched


def test_the_generated_letta_password_is_private_and_one_for_everyone(tmp_path):
    """Clients generating it at once (a bridge and a `say` at first start) agree on one value."""
    data = tmp_path / "data"
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(Settings(_env_file=None, VTL_DATA_DIR=str(data)).letta_password))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1 and len(found[0]) >= 24
    password_file = data / "letta" / "config" / "server-password"
    assert mode(password_file) == 0o600 and mode(password_file.parent) == 0o700


def test_our_services_run_with_umask_077_and_private_pid_and_log_files(tmp_path):
    part = ManagedProcess("probe", tmp_path / "run" / "probe.pid", tmp_path / "logs" / "probe.log", "umask-probe")
    script = "import os, sys; open(sys.argv[1], 'w').write('x'); print(oct(os.umask(0)))"
    pid = part.start([sys.executable, "-c", script, str(tmp_path / "made-by-child"), "umask-probe"],
                     env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert pid and mode(part.pid_file) == 0o600  # read before the probe exits (then it is removed)
    assert wait_until(lambda: part.log_file.read_text().strip() == "0o77", 10), part.log_tail()
    for path in (tmp_path / "made-by-child", part.log_file):
        assert mode(path) == 0o600, path
    assert mode(part.pid_file.parent) == 0o700 and mode(part.log_file.parent) == 0o700


# ---------------------------------------------------------------- the line filter


def test_the_line_filter_blanks_every_secret_and_hides_them_from_the_child(tmp_path):
    child = ("import os; print('▶ Using secure mode with password: s3cret-pw'); "
             "print('postgresql://letta:pg-pw@127.0.0.1/letta'); print('env has it:', 'VTL_REDACT' in os.environ); "
             "open('made', 'w').write('x'); print(oct(os.umask(0)))")
    done = subprocess.run([sys.executable, str(RUNNER), sys.executable, "-c", child], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "VTL_REDACT": "s3cret-pw\npg-pw"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "s3cret-pw" not in done.stdout and "pg-pw" not in done.stdout
    assert done.stdout.splitlines() == ["▶ Using secure mode with password: [redacted]",
                                        "postgresql://letta:[redacted]@127.0.0.1/letta", "env has it: False", "0o77"]
    assert mode(tmp_path / "made") == 0o600


def test_the_line_filter_passes_the_exit_status_on(tmp_path):
    done = subprocess.run([sys.executable, str(RUNNER), sys.executable, "-c", "raise SystemExit(3)"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=30)
    assert done.returncode == 3


# ---------------------------------------------------------------- .env


def test_a_readable_env_file_is_pointed_out(tmp_path, capsys):
    env = tmp_path / ".env"
    env.write_text("LETTA_API_KEY=x\n")
    env.chmod(0o644)
    warn_if_env_file_is_readable_by_others(env)
    assert "other users can read it: chmod 600" in capsys.readouterr().err
    env.chmod(0o600)
    warn_if_env_file_is_readable_by_others(env)
    warn_if_env_file_is_readable_by_others(tmp_path / "missing.env")
    assert capsys.readouterr().err == ""
