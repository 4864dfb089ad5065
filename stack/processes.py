"""Background processes the local stack starts, finds again and stops.

Each part is started detached (its own session, so a Ctrl-C in the shell that ran
`stack up` does not kill it), with its output in a log file and its pid in a pid
file. A pid file alone is not proof: pids are reused, so a process counts as ours
only while its command line still contains the marker we started it with. That is
what lets `stack down` stop exactly what `stack up` started and nothing else.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from vtuber_letta.private_files import PRIVATE_UMASK, private_dir, write_private


class StackError(RuntimeError):
    """A stack part could not be installed, started or stopped; the message says which and why."""


@dataclass(frozen=True)
class ManagedProcess:
    name: str
    pid_file: Path
    log_file: Path
    marker: str  # a string unique to our command line (e.g. the data dir or port)

    def pid(self) -> int | None:
        """The pid of our running process, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if _cmdline_contains(pid, self.marker):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, user: str | None = None) -> int:
        private_dir(self.log_file.parent)
        private_dir(self.pid_file.parent)
        command = list(argv)
        if user:
            command = as_user(user, command)
        # Logs are the operator's, not every local user's (0600), like the password files beside them;
        # the part itself runs with umask 077, so what it writes (Redis' append-only file, Letta's
        # own log and tool folders) is private too.
        with open(os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), "ab") as log:
            os.chmod(self.log_file, 0o600)
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=PRIVATE_UMASK,
            )
        write_private(self.pid_file, f"{proc.pid}\n")
        # The part outlives this object (it is found again by its pid file); keep its Popen for the
        # life of this program, so dropping it neither warns "still running" nor leaves a zombie
        # unreaped (`stop` reaps it).
        _STARTED[proc.pid] = proc
        return proc.pid

    def stop(self, *, timeout: float = 20.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout`. Returns True if a process of ours was stopped."""
        pid = self.pid()
        if pid is None:
            return False
        _signal_group(pid, signal.SIGTERM)
        if not wait_until(lambda: not _alive(pid), timeout):
            _signal_group(pid, signal.SIGKILL)
            wait_until(lambda: not _alive(pid), 5.0)
        self._forget(pid)
        return True

    def kill(self) -> bool:
        """SIGKILL the whole group at once, the crash case (fault tests): nothing gets to clean up.
        Returns True if a process of ours was killed."""
        pid = self.pid()
        if pid is None:
            return False
        _signal_group(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), 10.0)
        self._forget(pid)
        return True

    def _forget(self, pid: int) -> None:
        """After it ended: reap it and remove its pid file."""
        started = _STARTED.pop(pid, None)
        if started is not None:
            started.poll()
        self.pid_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # We started every part as a session leader, so its group holds any children it spawned.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)


_STARTED: dict[int, subprocess.Popen] = {}  # the parts this program started, by pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _cmdline_contains(pid: int, marker: str) -> bool:
    # /proc/<pid>/cmdline reads empty while the process is in the middle of an exec (setpriv exec'ing
    # the server just after start) and for a zombie: look again a few times before saying "not ours",
    # or a start would be taken for a crash (and its pid file deleted) now and then.
    for attempt in range(10):
        if not _alive(pid):
            return False
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if raw:
            return marker in raw.replace(b"\0", b" ").decode(errors="replace")
        time.sleep(0.02 * (attempt + 1))
    return False


def as_user(user: str, argv: Sequence[str]) -> list[str]:
    """argv run as `user` (we are root). setpriv execs in place (runuser would fork and not pass
    signals on), so the pid we record is the server's own and SIGINT/SIGTERM reach it directly."""
    account = pwd.getpwnam(user)
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin") or "/usr/bin/setpriv"
    return [setpriv, f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", "--", *argv]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_checked(argv: Sequence[str], *, what: str, env: Mapping[str, str] | None = None,
                cwd: Path | None = None, timeout: float = 1800) -> str:
    """Run a setup command to completion; on failure raise StackError with its output's tail."""
    try:
        done = subprocess.run(list(argv), env=None if env is None else dict(env), cwd=cwd,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise StackError(f"{what}: {exc.filename} not found") from None
    except subprocess.TimeoutExpired:
        raise StackError(f"{what}: timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise StackError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Letta's tool sandboxes, Postgres backends, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def listening_addresses(pid: int) -> set[str]:
    """Every TCP address ('host:port') on which `pid` or a descendant listens, read from /proc."""
    inodes: set[str] = set()
    for member in process_tree(pid):
        try:
            for fd in Path(f"/proc/{member}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                host_hex, port_hex = cols[1].split(":")
                found.add(f"{_decode_ip(host_hex, v6)}:{int(port_hex, 16)}")
    return found


def _decode_ip(hex_addr: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_addr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc prints IPv6 as four little-endian 32-bit words.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return "[" + socket.inet_ntop(socket.AF_INET6, words) + "]"
