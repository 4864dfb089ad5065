"""A new viewer's first turn through the bridge (their agent is created from the template on the
way: Redis lock, a tag search in Letta, agents.create, the map entry) vs a known viewer's turn
through the bridge, interleaved. The difference is what first contact costs a viewer."""

from __future__ import annotations

import asyncio

from bench.common import Bridge, BridgeSender, bench_stack, ensure_agents, log, ms, p50, p95, parse, parser, ratio, report, run_id, table

FULL = {"turns": 20, "warmup": 3}
QUICK = {"turns": 8, "warmup": 2}


async def measure(settings, args, known: str, rid: str) -> tuple[dict[str, list[float]], int]:
    times: dict[str, list[float]] = {"new": [], "known": []}
    new_viewer = iter(f"bench:fc-new-{rid}-{i}" for i in range(args.turns + 1))
    async with BridgeSender(settings) as bridge:
        send = {"new": lambda: bridge.turn(next(new_viewer), "你好呀，第一次来！"),
                "known": lambda: bridge.turn(known, "我又来啦！")}
        # Untimed: the known viewer's first turns, and one first contact (the bridge looks up the
        # template's shared blocks and tools once per process, on its first agent creation).
        await send["new"]()
        for _ in range(args.warmup):
            await send["known"]()
        for i in range(args.turns):
            for side in (("new", "known") if i % 2 == 0 else ("known", "new")):
                times[side].append(await send[side]())
        return times, bridge.unexpected


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--turns", type=int, help=f"timed turns per side (default {FULL['turns']}, quick {QUICK['turns']})")
    p.add_argument("--warmup", type=int, help="untimed turns of the known viewer first")
    args = parse(p, FULL, QUICK)
    with bench_stack(args.reuse_stack) as settings:
        rid = run_id()
        known = f"bench:fc-known-{rid}"
        ensure_agents(settings, [known])  # known: agent exists and is in the viewer -> agent map
        with Bridge(settings, args.reuse_stack) as bridge:
            log(f"{args.turns} new viewers' first turns and {args.turns} known-viewer turns, interleaved")
            times, unexpected = asyncio.run(measure(settings, args, known, rid))
        new, old = times["new"], times["known"]
        report("First contact: a new viewer's first turn vs a known viewer's turn (both through the bridge)",
               settings, args.reuse_stack, [
                   table(["turn", "n", "p50 ms", "p95 ms"], [
                       ["new viewer (agent created on the way)", len(new), ms(p50(new)), ms(p95(new))],
                       ["known viewer", len(old), ms(p50(old)), ms(p95(old))],
                   ]),
                   table(["p50 ratio new/known", "p50 difference ms", "median per-round difference ms", "p95 ratio"],
                         [[ratio(p50(new), p50(old)), ms(p50(new) - p50(old)),
                           ms(p50([x - y for x, y in zip(new, old)])), ratio(p95(new), p95(old))]]),
                   f"Replies other than the scripted one: {unexpected}. {bridge.problems()}.",
               ])


if __name__ == "__main__":
    main()
