"""Many viewers: (a) provisioning N viewers' agents with `ViewerAgents.ensure` (the first few one
at a time, the rest from a thread pool), and (b) the bridge's memory per known viewer: a fresh
process builds `RealLettaGateway` and calls `ensure_agent` for K viewers whose entries are in the
Redis map `vtl:viewer_agents` (filled with HSET, cycling over the agents of (a): the gateway reads
the map without asking Letta), measuring RSS (VmRSS) and, in a second fresh process, tracemalloc."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle

from bench.common import bench_stack, bridge_cwd, bridge_env, log, ms, p50, p95, parse, parser, report, run_id, table
from provisioning.viewers import ViewerAgents
from vtuber_letta import redis_keys as keys
from vtuber_letta.redis_api import redis_client

FULL = {"viewers": 500, "sequential": 5, "workers": 4, "known": 10_000}
QUICK = {"viewers": 40, "sequential": 3, "workers": 4, "known": 10_000}


# --------------------------------------------------------------------------- (a) provisioning

def provision_viewers(settings, args, rid: str) -> tuple[list[list], list[str]]:
    viewers = ViewerAgents(settings)  # one instance, shared by the pool's threads, as in the bridge
    viewers.ensure(f"bench:scale-{rid}-warm")  # untimed: looks up the shared blocks and tools once
    ids = [f"bench:scale-{rid}-{i}" for i in range(args.viewers)]

    def timed(viewer_id: str) -> tuple[float, str, bool]:
        started = time.perf_counter()
        agent = viewers.ensure(viewer_id)
        return time.perf_counter() - started, agent.agent_id, agent.created

    first = [timed(v) for v in ids[:args.sequential]]
    log(f"{len(first)} agents one at a time; {len(ids) - len(first)} more with {args.workers} threads")
    started = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        rest = list(pool.map(timed, ids[args.sequential:]))
    pool_wall = time.perf_counter() - started
    rows = []
    for phase, done, workers, wall in (("one at a time (the first few)", first, 1, sum(t for t, _, _ in first)),
                                       ("thread pool", rest, args.workers, pool_wall)):
        if not done:
            continue
        calls = [t for t, _, _ in done]
        created = sum(1 for _, _, c in done if c)
        rows.append([phase, len(done), created, workers, f"{wall:.1f}", ms(wall / len(done)), ms(p50(calls)),
                     ms(p95(calls)), f"{len(done) / wall:.1f}"])
    return rows, [agent_id for _, agent_id, _ in first + rest]


# --------------------------------------------------------------------------- (b) the bridge's memory

def fill_map(settings, prefix: str, count: int, agent_ids: list[str]) -> None:
    r = redis_client(settings)
    try:
        agents = cycle(agent_ids)
        for start in range(0, count + 1, 1000):
            r.hset(keys.VIEWER_AGENTS, mapping={f"{prefix}{i}": next(agents) for i in range(start, min(count + 1, start + 1000))})
    finally:
        r.close()


def clear_map(settings, prefix: str, count: int) -> None:
    r = redis_client(settings)
    try:
        for start in range(0, count + 1, 1000):
            r.hdel(keys.VIEWER_AGENTS, *(f"{prefix}{i}" for i in range(start, min(count + 1, start + 1000))))
    finally:
        r.close()


def run_child(settings, reuse: bool, mode: str, prefix: str, count: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--memory-child", mode, "--prefix", prefix, "--known", str(count)],
        env=bridge_env(settings, reuse), cwd=bridge_cwd(settings, reuse),
        capture_output=True, text=True, timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory child ({mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def vm_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def memory_child(mode: str, prefix: str, count: int) -> dict:
    """In a fresh process: a gateway, one warm-up viewer, then `count` viewers it learns from the map."""
    from bridge.letta_gateway import RealLettaGateway
    from vtuber_letta.settings import load_settings

    gateway = RealLettaGateway(load_settings())
    await gateway.ensure_agent(f"{prefix}{count}", None, None)  # untimed: clients, thread pool, imports
    gc.collect()
    if mode == "tracemalloc":
        tracemalloc.start()  # only what is allocated from here on is traced
    rss_before, traced_before = vm_rss(), tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    for i in range(count):
        await gateway.ensure_agent(f"{prefix}{i}", None, None)
    seconds = time.perf_counter() - started
    gc.collect()
    rss_after, traced_after = vm_rss(), tracemalloc.get_traced_memory()[0]
    return {"mode": mode, "known": len(gateway._agents) - 1, "seconds": seconds,
            "rss_before": rss_before, "rss_after": rss_after, "traced": traced_after - traced_before}


def memory_rows(settings, reuse: bool, agent_ids: list[str], count: int) -> list[list]:
    prefix = f"bench:mem-{run_id()}-"
    fill_map(settings, prefix, count, agent_ids)
    try:
        plain = run_child(settings, reuse, "rss", prefix, count)
        traced = run_child(settings, reuse, "tracemalloc", prefix, count)
    finally:
        clear_map(settings, prefix, count)
    mib = 1024 * 1024
    grown = plain["rss_after"] - plain["rss_before"]
    return [
        ["RSS (VmRSS), no tracing", plain["known"], f"{plain['rss_before'] / mib:.1f}", f"{plain['rss_after'] / mib:.1f}",
         f"{grown / mib:.2f}", f"{grown / plain['known']:.0f}", f"{plain['seconds']:.1f}"],
        ["tracemalloc (live Python objects)", traced["known"], "-", "-", f"{traced['traced'] / mib:.2f}",
         f"{traced['traced'] / traced['known']:.0f}", f"{traced['seconds']:.1f}"],
    ]


# --------------------------------------------------------------------------- main

def main() -> None:
    if "--memory-child" in sys.argv:  # the fresh process of (b)
        child = argparse.ArgumentParser()
        child.add_argument("--memory-child", choices=("rss", "tracemalloc"))
        child.add_argument("--prefix")
        child.add_argument("--known", type=int)
        a = child.parse_args()
        print(json.dumps(asyncio.run(memory_child(a.memory_child, a.prefix, a.known))))
        return
    p = parser(__doc__)
    p.add_argument("--viewers", type=int, help=f"agents to provision in (a) (default {FULL['viewers']}, quick {QUICK['viewers']})")
    p.add_argument("--sequential", type=int, help="of which the first few one at a time")
    p.add_argument("--workers", type=int, help="thread pool size for the rest (Letta is CPU-bound: about the cores)")
    p.add_argument("--known", type=int, help="known viewers in the bridge's map for (b)")
    args = parse(p, FULL, QUICK)
    with bench_stack(args.reuse_stack) as settings:
        provisioning, agent_ids = provision_viewers(settings, args, run_id())
        log(f"(b) the gateway's memory with {args.known} known viewers (two fresh processes)")
        memory = memory_rows(settings, args.reuse_stack, agent_ids, args.known)
        report("Scale: provisioning many viewers, and the bridge's memory per known viewer", settings,
               args.reuse_stack, [
                   f"(a) `ViewerAgents.ensure` for {args.viewers} new viewers (lock, map, tag search, agents.create, map entry).",
                   table(["phase", "agents", "created", "threads", "total s", "per agent ms (total/n)",
                          "p50 call ms", "p95 call ms", "agents/s"], provisioning),
                   f"(b) `RealLettaGateway.ensure_agent` for {args.known} viewers already in `{keys.VIEWER_AGENTS}`, "
                   "after one warm-up viewer; grown = after - before, each in a fresh process.",
                   table(["measure", "known viewers", "before MiB", "after MiB", "grown MiB", "bytes per viewer",
                          "ensure_agent total s"], memory),
               ])


if __name__ == "__main__":
    main()
