"""A stand-in for `letta server` that boots like uvicorn 0.29 does (tests/unit/test_letta_workers_launcher.py).

It answers GET /v1/health/ with {"status": "ok"} on 127.0.0.1:$FAKE_PORT (after
$FAKE_HEALTHY_AFTER_S seconds), and with LETTA_UVICORN_WORKERS above one it spawns that many
multiprocessing spawn children that just wait, as uvicorn's workers are spawned. Each boot and each
stop is a JSON line in $FAKE_BOOTS. Standard library only.
"""

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def worker() -> None:
    signal.pause()


def record(**fields) -> None:
    with open(os.environ["FAKE_BOOTS"], "a") as out:
        out.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")


def main() -> None:
    workers = int(os.environ["LETTA_UVICORN_WORKERS"])
    ready_at = time.monotonic() + float(os.environ.get("FAKE_HEALTHY_AFTER_S", "0"))

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/v1/health/" and time.monotonic() >= ready_at
            body = json.dumps({"status": "ok" if ok else "starting"}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    children = []
    if workers > 1:
        spawn = multiprocessing.get_context("spawn")
        children = [spawn.Process(target=worker, daemon=True) for _ in range(workers)]
        for child in children:
            child.start()
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["FAKE_PORT"])), Health)
    record(workers=workers)

    def stop(received: int, _frame) -> None:
        record(stopped_by=signal.Signals(received).name)
        for child in children:
            child.terminate()
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
