"""What the bridge adds to one viewer's turn: sequential turns through the bridge (LPUSH on
letta_requests -> the reply on letta_responses) vs straight to Letta (letta-client
messages.create), interleaved, each side on its own viewer's agent (same template).

The bridge reads Letta's reply as a token stream by default (VTL_BRIDGE_STREAMING), and Letta
answers a streamed request faster than a plain one, so a third side, direct with
`streaming=True, stream_tokens=True`, is measured in the same rounds: bridge vs that is the
bridge's own cost; bridge vs plain direct is what a client switching to the bridge sees."""

from __future__ import annotations

import asyncio

from bench.common import Bridge, BridgeSender, DirectSender, bench_stack, ensure_agents, log, ms, p50, p95, parse, parser, ratio, report, run_id, table

FULL = {"turns": 60, "warmup": 3, "settle_ms": 300}
QUICK = {"turns": 12, "warmup": 2, "settle_ms": 300}
SIDES = ("bridge", "direct", "direct-streamed")
LABELS = {"bridge": "bridge (LPUSH → letta_responses)", "direct": "direct (letta-client messages.create)",
          "direct-streamed": "direct, streamed (stream_tokens=True)"}


def text(i: int) -> str:
    return f"第{i}条：今天的直播好好看！"


async def measure(settings, args, viewers: dict[str, str], agents: dict[str, str]):
    direct, streamed = DirectSender(settings), DirectSender(settings, streaming=True)
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    try:
        async with BridgeSender(settings) as bridge:
            send = {"bridge": lambda i: bridge.turn(viewers["bridge"], text(i)),
                    "direct": lambda i: direct.turn(agents[viewers["direct"]], text(i)),
                    "direct-streamed": lambda i: streamed.turn(agents[viewers["direct-streamed"]], text(i))}
            for i in range(args.warmup):  # untimed: connections, caches, the agents' first turns
                for side in SIDES:
                    await send[side](i)
            for i in range(args.turns):
                # Rotate who goes first, so no side always runs right after the same other side, and
                # let the server settle between turns: Letta goes on working after a streamed reply
                # ends (see docs/LETTA_NOTES.md), which would otherwise slow whichever turn comes next.
                for side in SIDES[i % 3:] + SIDES[:i % 3]:
                    await asyncio.sleep(args.settle_ms / 1000)
                    times[side].append(await send[side](args.warmup + i))
            unexpected = bridge.unexpected + direct.unexpected + streamed.unexpected
    finally:
        await direct.close()
        await streamed.close()
    return times, unexpected


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--turns", type=int, help=f"timed turns per side (default {FULL['turns']}, quick {QUICK['turns']})")
    p.add_argument("--warmup", type=int, help="untimed turns per side first")
    p.add_argument("--settle-ms", type=int, help="idle pause before every timed turn (default 300)")
    args = parse(p, FULL, QUICK)
    with bench_stack(args.reuse_stack) as settings:
        rid = run_id()
        # One viewer (agent) per side: their histories grow alike, and never share turns.
        viewers = {side: f"bench:ovh-{side}-{rid}" for side in SIDES}
        agents = ensure_agents(settings, list(viewers.values()))
        with Bridge(settings, args.reuse_stack) as bridge:
            log(f"{args.warmup} warm-up + {args.turns} timed turns per side, interleaved")
            times, unexpected = asyncio.run(measure(settings, args, viewers, agents))
        b, d, s = (times[side] for side in SIDES)
        rows = [[LABELS[side], len(times[side]), ms(p50(times[side])), ms(p95(times[side]))] for side in SIDES]
        # Within one round the sides ran back to back: the median of per-round differences is
        # less sensitive to the machine's drift than the difference of two medians.
        compare = [[f"bridge vs {LABELS[side].split(' (')[0]}", ratio(p50(b), p50(other)), ms(p50(b) - p50(other)),
                    ms(p50([x - y for x, y in zip(b, other)])), ratio(p95(b), p95(other))]
                   for side, other in (("direct", d), ("direct-streamed", s))]
        report("Bridge overhead: one viewer, sequential turns", settings, args.reuse_stack, [
            table(["path", "n", "p50 ms", "p95 ms"], rows),
            table(["comparison", "p50 ratio", "p50 difference ms", "median per-round difference ms", "p95 ratio"],
                  compare),
            f"Replies other than the scripted one: {unexpected}. {bridge.problems()}.",
        ])


if __name__ == "__main__":
    main()
