"""Re-record the provisioning cassettes from a real Letta server.

    .venv/bin/python tests/cassettes/record.py

Starts a dedicated local stack (Postgres+pgvector, Letta 0.16.8, Redis, scripted model)
on fixed loopback ports with a fixed password and a fresh, empty data dir, runs
tests/unit/test_provisioning_cassettes.py against it with --record-mode=rewrite, then
stops the stack and deletes its data dir. Any developer stack on the default ports is
left alone. The ports are fixed so the recorded URLs are the same every time (replay
matches on them); the password never reaches a cassette (the authorization header is
filtered out), but is fixed anyway so nothing secret is involved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from stack.manager import Stack  # noqa: E402
from stack.private import private_data_dir, private_stack_settings  # noqa: E402
from stack.processes import port_open  # noqa: E402

TEST_MODULE = "tests/unit/test_provisioning_cassettes.py"
CASSETTE_DIR = REPO_ROOT / "tests" / "cassettes" / "provisioning"

# Must match RECORDING_URL / RECORDING_PASSWORD defaults in the test module.
LETTA_PORT = 18283
LETTA_URL = f"http://127.0.0.1:{LETTA_PORT}"
PASSWORD = "cassette-recording-password"
POSTGRES_PORT = 15433
REDIS_PORT = 16380
SCRIPTED_MODEL_PORT = 18399


def main(argv: list[str]) -> int:
    taken = [p for p in (LETTA_PORT, POSTGRES_PORT, REDIS_PORT, SCRIPTED_MODEL_PORT) if port_open("127.0.0.1", p)]
    if taken:
        print(f"record: port(s) {taken} are in use (a recording stack left running?); not recording", file=sys.stderr)
        return 2

    data_dir = private_data_dir()
    settings = private_stack_settings(
        data_dir,
        letta_api_url=LETTA_URL,
        letta_api_key=PASSWORD,
        postgres_port=POSTGRES_PORT,
        redis_port=REDIS_PORT,
        scripted_model_port=SCRIPTED_MODEL_PORT,
    )
    stack = Stack(settings, log=lambda msg: print(f"[stack] {msg}", flush=True))
    try:
        started = time.monotonic()
        stack.up()
        print(f"record: stack up in {time.monotonic() - started:.0f}s; recording into {CASSETTE_DIR}", flush=True)
        # Stale cassettes of renamed or removed tests must not linger.
        for old in CASSETTE_DIR.glob("*.yaml"):
            old.unlink()
        env = {
            **os.environ,
            "VTL_CASSETTE_LETTA_URL": LETTA_URL,
            "VTL_CASSETTE_LETTA_PASSWORD": PASSWORD,
        }
        result = subprocess.run(
            [sys.executable, "-m", "pytest", TEST_MODULE, "--record-mode=rewrite", "-p", "no:randomly",
             "-p", "no:cacheprovider", "-q", *argv],
            cwd=REPO_ROOT, env=env,
        )
        if result.returncode != 0:
            print("record: the tests failed while recording; the cassettes are incomplete, do not commit them",
                  file=sys.stderr)
        return result.returncode
    finally:
        print("record: stopping the recording stack: " + (", ".join(stack.down()) or "nothing to stop"), flush=True)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
