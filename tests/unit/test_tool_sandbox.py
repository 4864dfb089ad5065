"""The slim tool sandbox (stack/tool_sandbox.py), built for real into a temp dir and run the way
Letta runs it: `<dir>/venv/bin/python3 <script>` with the server's environment, cwd `<dir>`."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from stack import tool_sandbox

PROBE = """
import json, os, sys
found = {}
for module in ("pydantic", "letta_client", "tools"):
    try:
        __import__(module)
        found[module] = True
    except ImportError:
        found[module] = False
print(json.dumps({"env": dict(os.environ), "uid": os.getuid(), "executable": sys.executable, "imports": found}))
"""


def run_in(sandbox, tmp_path, extra_env):
    script = sandbox / "call.py"
    script.write_text(PROBE)
    script.chmod(0o600)  # as Letta's tempfile writes it
    env = {**os.environ, "OPENAI_API_KEY": "sk-secret", "LETTA_PG_URI": "postgresql://u:pw@h/db",
           "LETTA_ENCRYPTION_KEY": "enc", "LETTA_SERVER_PASSWORD": "pw", "PYTHONPATH": os.getcwd(), **extra_env}
    done = subprocess.run([str(sandbox / "venv" / "bin" / "python3"), str(script)], cwd=sandbox, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def sandbox():
    # Where the tool user can pass through (pytest's own tmp dirs are 0700 root).
    root = Path(tempfile.mkdtemp(prefix="vtl-sandbox-test-"))
    root.chmod(0o755)
    built = root / "sandbox"
    user = tool_sandbox.ensure_system_user(tool_sandbox.TOOL_USER)
    tool_sandbox.build(built, user=user)
    yield built, user
    shutil.rmtree(root, ignore_errors=True)


def test_a_tool_sees_only_the_variables_tools_read_and_no_package(sandbox, tmp_path):
    path, _ = sandbox
    report = run_in(path, tmp_path, {"LETTA_AGENT_ID": "agent-1", "VTL_MEMORY_TOKEN": "tok"})
    assert set(report["env"]) <= set(tool_sandbox.TOOL_ENV) | set(tool_sandbox.FIXED_ENV)
    assert report["env"]["LETTA_AGENT_ID"] == "agent-1" and report["env"]["VTL_MEMORY_TOKEN"] == "tok"
    assert not any(value in json.dumps(report["env"]) for value in ("sk-secret", "pw@h", "enc"))
    # This test's own interpreter has pydantic and our packages; the sandbox has neither.
    assert report["imports"] == {"pydantic": False, "letta_client": False, "tools": False}
    assert report["executable"].startswith(str(path / "venv" / "bin") + "/")


@pytest.mark.skipif(os.geteuid() != 0, reason="the user switch happens only when the server runs as root")
def test_as_root_a_tool_runs_as_the_unprivileged_tool_user(sandbox, tmp_path):
    path, user = sandbox
    report = run_in(path, tmp_path, {})
    assert report["uid"] == pwd.getpwnam(user).pw_uid != 0


def test_the_server_environment_points_letta_at_it(sandbox):
    path, _ = sandbox
    env = tool_sandbox.server_env(path)
    assert env == {"TOOL_EXEC_DIR": str(path), "TOOL_EXEC_VENV_NAME": "venv", "TOOL_EXEC_AUTORELOAD_VENV": "false"}
    assert (path / env["TOOL_EXEC_VENV_NAME"] / "bin" / "python3").exists()  # what Letta starts


def test_a_sandbox_is_rebuilt_when_its_launcher_is_not_the_current_one(tmp_path):
    built = tmp_path / "sb"
    tool_sandbox.build(built, user=None)
    assert tool_sandbox.is_built(built)
    launcher = built / "venv" / "bin" / "python3"
    launcher.write_text(launcher.read_text().replace(tool_sandbox.launcher_mark(), tool_sandbox.LAUNCHER_MARK))
    assert not tool_sandbox.is_built(built)
    assert not tool_sandbox.is_built(tmp_path / "missing")
