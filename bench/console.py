"""The console's viewer list with many viewers: how long one page takes, end to end over HTTP
from the stack's own console process (login once, then GET /viewers ... on one keep-alive
connection), for 10,000 viewers by default.

The viewers: `--agents` real agents (created from the template, each with a fact), and the rest
map-only (an entry in `vtl:viewer_agents` and a stats hash with a display name, as the bridge leaves them), so the
list is as big as a busy channel's without creating 10,000 agents. The real agents are the most
recently seen, so the default page (last seen, newest first) shows them and asks Letta for their
cards; a deep page shows map-only viewers (Letta answers with nothing to add). Target: < 300 ms a page.
"""

from __future__ import annotations

import http.client
import time
from urllib.parse import urlencode

from bench.common import bench_stack, ensure_agents, log, ms, p50, p95, parse, parser, report, run_id, table
from bridge.viewer_stats import NAME_FIELD, searchable_name
from vtuber_letta import redis_keys as keys
from vtuber_letta.redis_api import redis_client

FULL = {"viewers": 10_000, "agents": 100, "rounds": 20}
QUICK = {"viewers": 10_000, "agents": 10, "rounds": 3}
TARGET_MS = 300


def fill_viewers(settings, prefix: str, count: int, agent_ids: dict[str, str]) -> list[str]:
    """count viewers in the map with stats; the real agents' viewers last seen most recently."""
    r = redis_client(settings)
    now = time.time()
    map_only = [f"{prefix}{i:05d}" for i in range(count - len(agent_ids))]
    try:
        for start in range(0, len(map_only), 1000):
            chunk = map_only[start:start + 1000]
            with r.pipeline(transaction=False) as pipe:
                pipe.hset(keys.VIEWER_AGENTS, mapping={v: f"agent-map-only-{v}" for v in chunk})
                for n, viewer in enumerate(chunk, start):
                    pipe.hset(keys.viewer_stats(viewer), mapping={
                        "first_seen": repr(now - 86400 * 30), "last_seen": repr(now - 3600 - n), "visits": str(n % 50),
                        "messages": str(n % 300), "support:CNY": repr(float(n % 97)),
                        NAME_FIELD: searchable_name(f"Viewer Nº{n} {'小明' if n % 2 else 'Zoë'}")})
                pipe.execute()
        with r.pipeline(transaction=False) as pipe:
            for n, viewer in enumerate(agent_ids):
                pipe.hset(keys.viewer_stats(viewer), mapping={"first_seen": repr(now - 86400), "last_seen": repr(now - n),
                                                              "visits": "3", "messages": "12"})
            pipe.execute()
    finally:
        r.close()
    return map_only


def clear_viewers(settings, viewers: list[str]) -> None:
    r = redis_client(settings)
    try:
        for start in range(0, len(viewers), 1000):
            chunk = viewers[start:start + 1000]
            r.hdel(keys.VIEWER_AGENTS, *chunk)
            r.delete(*(keys.viewer_stats(v) for v in chunk))
    finally:
        r.close()


class ConsoleSession:
    """One logged-in keep-alive connection to the console."""

    def __init__(self, settings):
        host = "127.0.0.1" if settings.console_host in ("0.0.0.0", "::") else settings.console_host
        self.conn = http.client.HTTPConnection(host, settings.console_port, timeout=60)
        body = urlencode({"password": settings.console_password})
        self.conn.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
        response = self.conn.getresponse()
        response.read()
        cookie = response.getheader("Set-Cookie") or ""
        if response.status != 303 or not cookie:
            raise SystemExit(f"the console refused the login (HTTP {response.status})")
        self.cookie = cookie.split(";", 1)[0]

    def get(self, path: str) -> tuple[float, str]:
        started = time.perf_counter()
        self.conn.request("GET", path, headers={"Cookie": self.cookie})
        response = self.conn.getresponse()
        text = response.read().decode("utf-8")
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise SystemExit(f"GET {path}: HTTP {response.status}")
        return elapsed, text


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--viewers", type=int, help=f"viewers in the list (default {FULL['viewers']})")
    p.add_argument("--agents", type=int, help="of which real agents (the rest map-only)")
    p.add_argument("--rounds", type=int, help="timed requests per page kind")
    args = parse(p, FULL, QUICK)
    rid = run_id()
    with bench_stack(args.reuse_stack) as settings:
        log(f"creating {args.agents} agents, then {args.viewers - args.agents} map-only viewers")
        agents = ensure_agents(settings, [f"bench:console-{rid}-agent-{i}" for i in range(args.agents)])
        map_only = fill_viewers(settings, f"bench:console-{rid}-v", args.viewers, agents)
        try:
            session = ConsoleSession(settings)
            deep = max(1, (args.viewers // 50) // 2)
            kinds = [
                ("page 1, last seen (the agents' cards from Letta)", "/viewers"),
                (f"page {deep}, last seen (map-only rows)", f"/viewers?page={deep}"),
                ("page 1, total support (every viewer's stats read)", "/viewers?sort=support&order=desc"),
                ("page 1, viewer id ascending", "/viewers?sort=id&order=asc"),
                ("search '-v0' (substring over every id)", "/viewers?q=-v0"),
                ("search 'ZOË' (substring over every display name)", "/viewers?q=ZO%C3%8B"),
            ]
            rows = []
            for name, path in kinds:
                _, first = session.get(path)  # untimed: warm
                if first.count("<tr>") < 2:  # the header row and at least one viewer
                    raise SystemExit(f"GET {path}: the page has no rows")
                times = [session.get(path)[0] for _ in range(args.rounds)]
                rows.append([name, args.viewers, args.rounds, ms(p50(times)), ms(p95(times)), ms(max(times)),
                             "yes" if p95(times) * 1000 < TARGET_MS else "NO"])
                log(f"{name}: p50 {ms(p50(times))} ms")
        finally:
            clear_viewers(settings, map_only)
        report("Console: the viewer list with many viewers", settings, args.reuse_stack, [
            f"GET over HTTP from the stack's console process, one keep-alive connection, logged in; {args.agents} "
            f"real agents (the newest) and {args.viewers - args.agents} map-only viewers. Target: p95 < {TARGET_MS} ms.",
            table(["page", "viewers", "requests", "p50 ms", "p95 ms", "max ms", f"< {TARGET_MS} ms"], rows),
        ])


if __name__ == "__main__":
    main()
