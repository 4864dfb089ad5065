"""Burst coalescing: one viewer sends 10 messages in quick succession (0, 50 and 100 ms apart:
most arrive while their first turn is running). How many Letta turns does the burst cost, and how
long until every message has its response? Coalescing on (VTL_BRIDGE_COALESCE_MAX=8, the default)
vs off (1), in alternating blocks of the same run; turns are counted on the Letta server (distinct
runs of the burst's user messages in the agent's history), not taken from the bridge."""

from __future__ import annotations

import asyncio

from bench.common import Bridge, bench_stack, ensure_agents, log, ms, p50, p95, parse, parser, ratio, report, run_id, table
from bench.published import Published
from bridge.letta_turns import otid_for
from vtuber_letta.letta_api import letta_client

FULL = {"rounds": 6, "bursts": 2, "size": 10, "gaps_ms": "0,50,100"}
QUICK = {"rounds": 2, "bursts": 1, "size": 10, "gaps_ms": "0,100"}


async def one_burst(published: Published, viewer: str, size: int, gap_s: float) -> tuple[list[str], float, int]:
    """(task ids, seconds from the first push to the last response, tasks answered by another's reply)."""
    ids = []
    for i in range(size):
        ids.append(await published.push(viewer, f"burst message {i}: 哈哈哈 {i}"))
        await asyncio.sleep(gap_s)
    await published.wait_final(ids)
    seen = [published.tasks[t] for t in ids]
    drained = max(s.final[0] for s in seen) - seen[0].pushed
    folded = sum(bool(s.final[1].get("answered_by")) for s in seen)
    return ids, drained, folded


async def block(settings, viewer: str, bursts: int, size: int, gaps_ms: list[int]):
    """(gap, task ids, drained, folded) of every burst: each gap in turn, `bursts` times."""
    async with Published(settings) as published:
        return [(gap, *await one_burst(published, viewer, size, gap / 1000)) for _ in range(bursts) for gap in gaps_ms]


def letta_turns(client, agent_id: str, task_ids: list[str]) -> int:
    """Distinct Letta runs that carried these tasks' user messages (each task must be in exactly one)."""
    wanted = {otid_for(t) for t in task_ids}
    runs: dict[str, list[str]] = {}
    for message in client.agents.messages.list(agent_id, order="desc", limit=300).items:
        if getattr(message, "message_type", None) == "user_message" and message.otid in wanted:
            runs.setdefault(message.otid, []).append(message.run_id)
    if sorted(runs) != sorted(wanted) or any(len(r) != 1 for r in runs.values()):
        raise RuntimeError(f"the burst's messages are not each in exactly one turn: {runs}")
    return len({r[0] for r in runs.values()})


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, help="blocks per side, alternating (coalescing on, off, on, ...)")
    p.add_argument("--bursts", type=int, help="bursts per block")
    p.add_argument("--size", type=int, help="messages per burst")
    p.add_argument("--gaps-ms", help="pauses between two messages of a burst, comma-separated")
    args = parse(p, FULL, QUICK)
    gaps = [int(g) for g in args.gaps_ms.split(",")]
    with bench_stack(args.reuse_stack) as settings:
        rid = run_id()
        viewers = {8: f"bench:burst-on-{rid}", 1: f"bench:burst-off-{rid}"}
        agents = ensure_agents(settings, list(viewers.values()))
        client = letta_client(settings)
        results: dict[tuple[int, int], list[tuple[int, float, int]]] = {(g, m): [] for g in gaps for m in (8, 1)}
        problems = []
        for round_no in range(args.rounds):
            for limit in ((8, 1) if round_no % 2 == 0 else (1, 8)):
                with Bridge(settings, args.reuse_stack, VTL_BRIDGE_COALESCE_MAX=limit) as bridge:
                    log(f"round {round_no + 1}/{args.rounds}: coalescing {'on' if limit > 1 else 'off'}")
                    for gap, ids, drained, folded in asyncio.run(
                            block(settings, viewers[limit], args.bursts, args.size, gaps)):
                        results[gap, limit].append((letta_turns(client, agents[viewers[limit]], ids), drained, folded))
                    problems.append(bridge.problems())
        rows = []
        for gap in gaps:
            for limit, label in ((8, "on (max 8)"), (1, "off")):
                turns = [x[0] for x in results[gap, limit]]
                drained = [x[1] for x in results[gap, limit]]
                rows.append([f"{gap} ms", label, len(turns), f"{p50(turns):.0f}", max(turns),
                             f"{p50(turns) / args.size:.2f}", ms(p50(drained)), ms(p95(drained))])
        speedup = [f"{gap} ms apart: {ratio(p50([x[1] for x in results[gap, 8]]), p50([x[1] for x in results[gap, 1]]))}"
                   for gap in gaps]
        report(f"Burst coalescing: {args.size} messages from one viewer", settings, args.reuse_stack, [
            table(["messages apart", "coalescing", "bursts", "Letta turns p50", "Letta turns max", "turns per message",
                   "all answered p50 ms", "all answered p95 ms"], rows),
            "Every message got its response in every burst (the folded ones name the reply that answered them: "
            "`answered_by`). Time until the whole burst is answered, coalescing on / off: " + "; ".join(speedup)
            + ". " + "; ".join(sorted(set(problems))) + ".",
        ])


if __name__ == "__main__":
    main()
