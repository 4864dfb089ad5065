"""Redis memory per task: what a queued chat message and an answered one's done marker cost.

A private redis-server of the stack (stack/redis_server.py, the same config as `stack up`); no
Letta. Three figures, each from INFO memory's used_memory before and after `--tasks` entries:
  queued      a chat task as the host LPUSHes it (vtuber_letta/commands/say.py build_task), the shape it keeps
              while it waits on letta_requests or in a viewer's queue
  intake      its intake stamp (`vtl:intake`, task id -> ms), kept while it is in a viewer's queue
  done        an answered task's done marker (`vtl:done:<task_id>`, the outcome word: "answered"),
              kept for VTL_BRIDGE_DONE_TTL (24 h by default) so that a redelivered task is dropped
              instead of answered twice
The message is chat-sized (`--text-chars`, CJK as in a Chinese chat)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from datetime import datetime, timezone

from bench.common import command_line, log, table
from stack.private import private_data_dir
from stack.processes import free_port
from stack.redis_server import RedisServer
from vtuber_letta import redis_keys as keys
from vtuber_letta.commands.say import build_task
from vtuber_letta.redis_api import redis_client
from vtuber_letta.settings import Settings

FULL = {"tasks": 100_000}
QUICK = {"tasks": 5_000}
BATCH = 1000


def used_memory(r) -> int:
    return int(r.info("memory")["used_memory"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK['tasks']} entries per figure (seconds)")
    p.add_argument("--tasks", type=int, help=f"entries per figure (default {FULL['tasks']})")
    p.add_argument("--text-chars", type=int, default=40, help="characters of a chat message")
    args = p.parse_args()
    args.tasks = args.tasks or (QUICK if args.quick else FULL)["tasks"]
    data_dir = private_data_dir(prefix="vtl-bench-redis-")
    port = free_port()
    server = RedisServer(data_dir, "127.0.0.1", port, None)
    server.start(log)
    text = ("主播晚上好" * args.text_chars)[:args.text_chars]
    try:
        r = redis_client(Settings(_env_file=None, redis_url=f"redis://127.0.0.1:{port}/0"))
        version = r.info("server")["redis_version"]
        rows = []
        for figure in ("queued", "intake", "done"):
            r.flushall()
            before = used_memory(r)
            started = time.perf_counter()
            for first in range(0, args.tasks, BATCH):
                pipe = r.pipeline(transaction=False)
                for i in range(first, min(first + BATCH, args.tasks)):
                    task = build_task(f"bilibili:{100000 + i}", text, display_name=f"viewer{i}", platform="bilibili")
                    if figure == "queued":
                        pipe.lpush(keys.LETTA_REQUESTS, json.dumps(task, ensure_ascii=False))
                    elif figure == "intake":
                        pipe.hsetnx(keys.BRIDGE_INTAKE, task["task_id"], int(time.time() * 1000))
                    else:  # what FINISH writes (bridge/outputs.py done_markers)
                        pipe.set(keys.task_done(task["task_id"]), "answered", ex=86400)
                pipe.execute()
            grown = used_memory(r) - before
            log(f"{figure}: {args.tasks} entries in {time.perf_counter() - started:.1f}s, {grown / 2**20:.1f} MiB")
            rows.append([figure, args.tasks, f"{grown / 2**20:.1f}", round(grown / args.tasks)])
        r.close()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    print("## Redis memory per task\n")
    print(f"Command: `{command_line()}`  ")
    print(f"Machine: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {os.cpu_count()} CPUs; redis-server {version}\n")
    print(f"{args.tasks} entries per figure, messages of {args.text_chars} characters (CJK).\n")
    print(table(["figure", "entries", "used_memory grown MiB", "bytes per task"], rows) + "\n")


if __name__ == "__main__":
    main()
