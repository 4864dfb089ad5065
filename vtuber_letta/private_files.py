"""Files and folders only their owner can read: passwords, logs, pid files, the stack's data.

One rule for everything vtuber-letta writes on this machine: files 0600, folders 0700, and the
services it starts run with umask 077 so whatever they create is private too. The one exception is
a folder the stack's unprivileged Postgres user must pass through to reach its own data
(TRAVERSE_ONLY: others may enter it by a name they already know, never list or read it).
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
TRAVERSE_ONLY = 0o711


def private_dir(path: Path, mode: int = PRIVATE_DIR) -> Path:
    """`path` as a folder of `mode`, whatever mode it had; missing parents are made with `mode` too."""
    missing = []
    while not path.exists() and path not in missing:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=mode, exist_ok=True)
        os.chmod(folder, mode)
    target = missing[0] if missing else path
    os.chmod(target, mode)
    return target


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` as a 0600 file (never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fd, PRIVATE_FILE)  # an existing file keeps its mode through O_CREAT: set it
        fh.write(text)


def create_private(path: Path, text: str) -> bool:
    """Write `text` to a new 0600 file at `path`; False if the file exists already (then it is
    left as it is: two processes generating the same password agree on the first one written)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return True


def make_private(root: Path) -> None:
    """Take group and other permissions off `root` and everything below it (an older data dir)."""
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            _strip(Path(folder) / name)
    _strip(root)


def _strip(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not path.is_symlink() and info.st_mode & 0o077:
        os.chmod(path, info.st_mode & 0o7700)


def readable_by_others(path: Path) -> bool:
    """True if someone but the owner may read (or, for a folder, list) `path`."""
    return bool(path.stat().st_mode & 0o044)
