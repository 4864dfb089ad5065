"""Run a command and copy its output to our stdout with secrets blanked out.

Letta 0.16.8 prints its server password at start ("Using secure mode with password: ...",
letta/server/rest_api/app.py, whenever secure mode is on, given password or not). Its log must
never hold it, so both the local stack and the letta container of docker-compose.yml run Letta
through this wrapper. The secrets come in the VTL_REDACT environment variable (one per line;
never on the command line, which `ps` shows) and are removed from the child's environment.
The child runs with umask 077: what it writes (Letta's own log, its tool folders) is private.
Standard library only (the letta/letta image runs it with its own Python).
"""

import os
import signal
import subprocess
import sys

REDACT_ENV = "VTL_REDACT"
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def main() -> int:
    secrets = [s.encode() for s in os.environ.pop(REDACT_ENV, "").splitlines() if s]
    os.umask(0o077)
    # The local stack signals the whole process group, so the child gets SIGTERM/SIGINT itself and
    # we only keep copying its output until it has exited. In a container we are PID 1 and the
    # only process `docker stop` signals: there we pass the signal on.
    children: list[subprocess.Popen] = []
    if os.getpid() == 1:
        def forward(received: int, _frame) -> None:
            for child in children:
                child.send_signal(received)
        handler = forward
    else:
        handler = signal.SIG_IGN
    for sig in FORWARDED:
        signal.signal(sig, handler)
    child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=os.environ,
                             preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in FORWARDED])
    children.append(child)
    out = sys.stdout.buffer
    for line in iter(child.stdout.readline, b""):
        for secret in secrets:
            line = line.replace(secret, b"[redacted]")
        out.write(line)
        out.flush()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
