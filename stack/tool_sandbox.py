"""The slim environment Letta runs our custom tools in.

Why: Letta 0.16.8 runs every custom-tool call as a new process. With its default sandbox that
process is the server's own interpreter, and the generated script imports all of `letta` (for
argument coercion, whenever the tool has an argument) and tries `letta_client`: ~4.5 CPU-seconds
per call, and the child inherits the server's whole environment (the model key, the database URI,
the encryption key). Letta can run tools in a named venv instead (TOOL_EXEC_DIR +
TOOL_EXEC_VENV_NAME, with TOOL_EXEC_AUTORELOAD_VENV=false so no boot deletes it and runs pip):
it starts `<dir>/<venv>/bin/python3`, and when neither letta nor letta_client can be imported
there, the script's optional imports fail in milliseconds.

What this builds, under one directory (the server's TOOL_EXEC_DIR):

    <dir>/venv/            a venv without pip and without any package: standard library only
    <dir>/venv/bin/python3 our launcher, not the interpreter: it
                           - keeps only the environment variables the tools read (TOOL_ENV),
                             so no secret of the server's environment reaches a tool;
                           - when started as root, drops to an unprivileged user first, so a tool
                             cannot read the server's /proc/<pid>/environ or its 0600 files;
                           - runs the venv's interpreter isolated (-I: no PYTHON* variables, no
                             user site, no script directory on sys.path; -S: no site at all).

Standard library only and runnable as a script, so the Docker image of the Letta server builds
the same thing (`python3 tool_sandbox.py /opt/vtl-tool-sandbox --user vtl-tools`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

VENV_NAME = "venv"
TOOL_USER = "vtl-tools"  # the user tools run as when the server runs as root
LAUNCHER_MARK = "# vtuber-letta tool sandbox launcher"
LAUNCHER_VERSION = 2  # bump when launcher_script changes, so `make install` rebuilds old sandboxes

# Every environment variable a tool may read; nothing else crosses into a tool process.
# LETTA_AGENT_ID / LETTA_TOOL_ID are set by Letta for each call; the VTL_* ones are the
# agent's own secrets (set by provisioning) or the server's tool settings.
TOOL_ENV = (
    "LETTA_AGENT_ID",
    "LETTA_TOOL_ID",
    "VTL_AVATAR_EXPRESSIONS",
    "VTL_AVATAR_MOTIONS",
    "VTL_MEMORY_GATE_URL",
    "VTL_MEMORY_TOKEN",
)
FIXED_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONUNBUFFERED": "1",
    "HOME": "/nonexistent",
}


def server_env(sandbox_dir: Path) -> dict[str, str]:
    """What the Letta server's environment needs so that it runs tools here."""
    return {
        "TOOL_EXEC_DIR": str(sandbox_dir),
        "TOOL_EXEC_VENV_NAME": VENV_NAME,
        # On: every boot deletes the venv and runs pip (which needs the network).
        "TOOL_EXEC_AUTORELOAD_VENV": "false",
    }


def launcher_script(interpreter: Path, user: str | None) -> str:
    """The bin/python3 that Letta starts: scrub the environment, drop privileges, run isolated.

    Letta writes each call's script as a 0600 file of the server's user; when we drop to another
    user the launcher (still the server's user) opens it and hands it over on standard input.
    """
    keep = " ".join(f'"{name}=${{{name}-}}"' for name in TOOL_ENV)
    fixed = " ".join(f"{name}={shlex.quote(value)}" for name, value in FIXED_ENV.items())
    run = f"{shlex.quote(str(interpreter))} -I -S"  # isolated, and no site: the venv holds no package
    lines = [
        "#!/bin/sh",
        launcher_mark(),
        "# Built by stack/tool_sandbox.py; Letta runs it as `python3 <script>` in TOOL_EXEC_DIR.",
        'script="$1"',
        '[ -n "$script" ] || { echo "usage: python3 SCRIPT" >&2; exit 2; }',
    ]
    if user:
        lines += [
            'if [ "$(id -u)" = 0 ]; then',
            f'  exec /usr/bin/env -i {keep} {fixed} \\',
            f"    setpriv --reuid={shlex.quote(user)} --regid={shlex.quote(user)} --clear-groups \\",
            f'    --inh-caps=-all --bounding-set=-all --no-new-privs {run} - < "$script"',
            "fi",
        ]
    lines.append(f'exec /usr/bin/env -i {keep} {fixed} {run} "$script"')
    return "\n".join(lines) + "\n"


def launcher_mark() -> str:
    """The launcher's second line: names what it passes, so a changed list means a rebuild."""
    digest = hashlib.sha256(repr((LAUNCHER_VERSION, TOOL_ENV, FIXED_ENV)).encode()).hexdigest()[:12]
    return f"{LAUNCHER_MARK} {digest}"


def is_built(sandbox_dir: Path) -> bool:
    """True when the sandbox exists and its launcher is the one this code builds."""
    launcher = sandbox_dir / VENV_NAME / "bin" / "python3"
    try:
        return launcher.read_text().splitlines()[1] == launcher_mark()
    except (OSError, IndexError):
        return False


def default_python() -> str:
    """The system's interpreter when there is one: the tool user must reach it (an interpreter under
    /root, e.g. pyenv's, is out of its reach and would run without its standard library)."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def build(sandbox_dir: Path, *, user: str | None, python: str | None = None) -> Path:
    """Create (or re-create) the sandbox and check it runs; returns the launcher's path. Offline."""
    python = python or default_python()
    sandbox_dir = sandbox_dir.resolve()
    env_dir = sandbox_dir / VENV_NAME
    base = _base_interpreter(python)
    if env_dir.exists():
        shutil.rmtree(env_dir)
    sandbox_dir.mkdir(parents=True, exist_ok=True)
    # Letta writes each call's script here (0600, the server's user); the tool user may only pass through.
    os.chmod(sandbox_dir, 0o711)
    subprocess.run([base, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    # bin/python3 becomes the launcher; the versioned name points straight at the real interpreter
    # (venv may have linked it to python3, which would make the launcher start itself).
    interpreter = env_dir / "bin" / _versioned_name(base)
    for name in (interpreter.name, "python"):
        (env_dir / "bin" / name).unlink(missing_ok=True)
    interpreter.symlink_to(os.path.realpath(base))
    (env_dir / "bin" / "python").symlink_to(interpreter.name)
    launcher = env_dir / "bin" / "python3"
    if launcher.is_symlink() or launcher.exists():
        launcher.unlink()
    launcher.write_text(launcher_script(interpreter, user))
    launcher.chmod(0o755)
    env_dir.chmod(0o755)
    _check(sandbox_dir, launcher)
    return launcher


def _check(sandbox_dir: Path, launcher: Path) -> None:
    """Run one script the way Letta will, as the tool user: it must find its own standard library."""
    probe = sandbox_dir / "vtl-sandbox-check.py"
    probe.write_text("import json, sys\nprint(json.dumps(sys.executable))\n")
    probe.chmod(0o600)
    try:
        done = subprocess.run([str(launcher), str(probe)], cwd=sandbox_dir, capture_output=True, text=True, timeout=60)
    finally:
        probe.unlink()
    executable = done.stdout.strip().strip('"')
    if done.returncode != 0 or not executable.startswith(str(launcher.parent) + "/"):
        raise RuntimeError(f"the tool sandbox at {sandbox_dir} does not run ({executable!r}, exit {done.returncode}): "
                           f"{done.stderr.strip()[-500:]}")


def _versioned_name(python: str) -> str:
    out = subprocess.run([python, "-c", "import sys; print('python%d.%d' % sys.version_info[:2])"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _base_interpreter(python: str) -> str:
    """The system interpreter behind `python` (a venv's python would drag its site-packages along)."""
    out = subprocess.run([python, "-c", "import sys; print(sys._base_executable)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip() or python


def ensure_system_user(name: str) -> str | None:
    """An unprivileged system user (made if missing) when we are root; None when we are not.
    Tools run as one (TOOL_USER), Postgres as another: a tool must never be able to read pgdata."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the slim sandbox Letta runs vtuber-letta's tools in.")
    parser.add_argument("dir", type=Path, help="the directory to give the Letta server as TOOL_EXEC_DIR")
    parser.add_argument("--user", default=TOOL_USER, help="the user tools run as when the server is root")
    parser.add_argument("--python", default=None, help="the interpreter to base the venv on (default: /usr/bin/python3)")
    args = parser.parse_args(argv)
    launcher = build(args.dir, user=ensure_system_user(args.user), python=args.python)
    print(f"tool sandbox: {launcher}")
    for name, value in server_env(args.dir.resolve()).items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
