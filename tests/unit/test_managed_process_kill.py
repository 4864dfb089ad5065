"""ManagedProcess.kill: the crash of a stack part (fault tests SIGKILL Letta with it)."""

from __future__ import annotations

import sys

from stack.processes import ManagedProcess, _alive, wait_until


def test_kill_ends_the_whole_group_at_once_even_a_part_that_ignores_sigterm(tmp_path):
    part = ManagedProcess("probe", tmp_path / "run" / "probe.pid", tmp_path / "logs" / "probe.log", "kill-probe")
    child_pid_file = tmp_path / "child.pid"
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(child_pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    pid = part.start([sys.executable, "-c", script, "kill-probe"], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert wait_until(lambda: child_pid_file.exists() and child_pid_file.read_text(), 10), part.log_tail()
    child = int(child_pid_file.read_text())
    assert part.kill() is True
    assert not _alive(pid) and wait_until(lambda: not _alive(child), 5)
    assert not part.pid_file.exists() and part.pid() is None
    assert part.kill() is False  # nothing of ours left to kill
