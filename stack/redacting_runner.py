"""Run a command and copy its output to our stdout with secrets blanked out.

Letta 0.16.8 prints its server password at start ("Using secure mode with password: ...").
Its log must never hold it, so the stack runs Letta through this wrapper. The secrets
come in the VTL_REDACT environment variable (one per line; never on the command line,
which `ps` shows) and are removed from the child's environment. Standard library only.
"""

import os
import signal
import subprocess
import sys


def main() -> int:
    secrets = [s.encode() for s in os.environ.pop("VTL_REDACT", "").splitlines() if s]
    # The stack signals the whole process group: the child gets SIGTERM/SIGINT itself, and
    # we keep copying its output until it has exited.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=os.environ,
                             preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGINT)])
    out = sys.stdout.buffer
    for line in iter(child.stdout.readline, b""):
        for secret in secrets:
            line = line.replace(secret, b"[redacted]")
        out.write(line)
        out.flush()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
