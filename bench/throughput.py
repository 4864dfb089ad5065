"""Completed turns per second with many viewers at once: through the bridge vs straight to Letta.

At each concurrency level C, C viewers talk at the same time, each sending M turns one after the
other (waiting for each reply). Bridge side: the tasks go through a `vtuber-letta bridge`
subprocess, which runs at most VTL_BRIDGE_CONCURRENCY turns at once. Direct side: one asyncio task
per viewer doing sequential `messages.create`. Each level runs a bridge round and a direct round
(alternating which goes first), repeated R times; medians over rounds are reported. The level where
direct turns/s stops growing is Letta's own saturation point on this machine."""

from __future__ import annotations

import asyncio
import time

from bench.common import (
    Bridge, BridgeSender, DirectSender, bench_stack, ensure_agents, log, ms, p50, parse, parser, ratio, report,
    run_id, table,
)

FULL = {"levels": "1,8,32,128", "turns": 3, "rounds": 3, "warmup": 3}
QUICK = {"levels": "1,4,8", "turns": 2, "rounds": 2, "warmup": 1}
PLATEAU = 0.90  # "stops growing": a level within 10 % of the best level's turns/s


async def one_round(send, viewers: list[str], turns: int, tag: str) -> dict:
    """All viewers at once, each sending `turns` turns in sequence; wall time of the whole round."""
    latencies: list[float] = []
    errors: list[str] = []

    async def viewer(index: int, viewer_id: str) -> None:
        for m in range(turns):
            try:
                latencies.append(await send(index, viewer_id, f"{tag} 第{m}条：主播晚上好！"))
            except Exception as exc:  # counted and shown: an error is a result, not a crash
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    started = time.perf_counter()
    await asyncio.gather(*(viewer(i, v) for i, v in enumerate(viewers)))
    wall = time.perf_counter() - started
    return {"tps": len(latencies) / wall, "latencies": latencies, "errors": errors}


async def measure(settings, args, levels: list[int], viewers: dict[str, list[str]], agents: dict[str, str]):
    direct = DirectSender(settings, concurrency=max(levels), streaming=args.direct_streaming)
    results = {(side, level): [] for side in ("bridge", "direct") for level in levels}
    try:
        async with BridgeSender(settings) as bridge:
            send = {"bridge": lambda i, v, text: bridge.turn(v, text),
                    "direct": lambda i, v, text: direct.turn(agents[v], text, slot=i)}
            for side in send:  # untimed warm-up: connections, caches
                await one_round(send[side], viewers[side][:1], args.warmup, "warm-up")
            for rnd in range(args.rounds):
                for li, level in enumerate(levels):
                    order = ("bridge", "direct") if (rnd + li) % 2 == 0 else ("direct", "bridge")
                    for side in order:
                        result = await one_round(send[side], viewers[side][:level], args.turns, f"r{rnd}")
                        results[side, level].append(result)
                        log(f"round {rnd + 1}/{args.rounds} level {level:>3} {side:<6}: {result['tps']:.2f} turns/s, "
                            f"turn p50 {ms(p50(result['latencies']))} ms, max {ms(max(result['latencies'], default=0))} ms, "
                            f"{len(result['errors'])} errors")
            unexpected = bridge.unexpected + direct.unexpected
    finally:
        await direct.close()
    return results, unexpected


def saturation(levels: list[int], tps: dict[int, float]) -> str:
    """The lowest level within 10 % of the best direct turns/s: where adding viewers stops paying.
    Measured against the best level rather than level to level, so one noisy dip cannot fake it."""
    if len(levels) < 2:
        return "One concurrency level only: no saturation point."
    best = max(levels, key=lambda level: tps[level])
    plateau = min(level for level in levels if tps[level] >= PLATEAU * tps[best])
    if plateau == levels[-1]:
        return (f"Letta (direct) was still growing at {levels[-1]} concurrent viewers ({tps[plateau]:.2f} turns/s): "
                "no saturation seen in these levels.")
    return (f"Letta's saturation point (direct): **{plateau} concurrent viewers**, {tps[plateau]:.2f} turns/s, "
            f"within {1 - PLATEAU:.0%} of the best level ({tps[best]:.2f} turns/s at {best}); "
            "more viewers at once only queue.")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--levels", help=f"concurrent viewers, comma separated (default {FULL['levels']}, quick {QUICK['levels']})")
    p.add_argument("--turns", type=int, help="turns each viewer sends in sequence per round (M)")
    p.add_argument("--rounds", type=int, help="rounds per level and side (R); medians over rounds")
    p.add_argument("--warmup", type=int, help="untimed turns per side first")
    p.add_argument("--bridge-concurrency", type=int, help="VTL_BRIDGE_CONCURRENCY of the bridge (default: its own default)")
    p.add_argument("--direct-streaming", action="store_true",
                   help="direct sends read the reply as a token stream, as the bridge does by default")
    args = parse(p, FULL, QUICK)
    levels = sorted({int(x) for x in args.levels.split(",")})
    with bench_stack(args.reuse_stack) as settings:
        concurrency = args.bridge_concurrency or settings.bridge_concurrency
        rid = run_id()
        viewers = {side: [f"bench:tp-{side}-{rid}-{i}" for i in range(max(levels))] for side in ("bridge", "direct")}
        started = time.perf_counter()
        agents = ensure_agents(settings, viewers["bridge"] + viewers["direct"])
        log(f"{len(agents)} agents ready in {time.perf_counter() - started:.0f}s")
        with Bridge(settings, args.reuse_stack, VTL_BRIDGE_CONCURRENCY=concurrency) as bridge:
            results, unexpected = asyncio.run(measure(settings, args, levels, viewers, agents))
        median = {key: p50([r["tps"] for r in rounds]) for key, rounds in results.items()}
        rows = []
        for level in levels:
            latency = {side: p50([x for r in results[side, level] for x in r["latencies"]]) for side in ("bridge", "direct")}
            errors = {side: sum(len(r["errors"]) for r in results[side, level]) for side in ("bridge", "direct")}
            rows.append([level, level * args.turns, f"{median['bridge', level]:.2f}", f"{median['direct', level]:.2f}",
                         ratio(median["bridge", level], median["direct", level]),
                         ms(latency["bridge"]), ms(latency["direct"]), f"{errors['bridge']} / {errors['direct']}"])
        first_errors = [e for rounds in results.values() for r in rounds for e in r["errors"]][:3]
        direct_kind = "streamed (stream_tokens)" if args.direct_streaming else "plain messages.create"
        report("Throughput: many viewers at once, bridge vs direct", settings, args.reuse_stack, [
            f"Bridge: VTL_BRIDGE_CONCURRENCY={concurrency}. Direct: one asyncio task per viewer, {direct_kind}. "
            f"Turns/s = completed turns / wall time of the round; median of {args.rounds} round(s) per cell.",
            table(["viewers", "turns per round", "bridge turns/s", "direct turns/s", "ratio bridge/direct",
                   "bridge p50 turn ms", "direct p50 turn ms", "errors bridge / direct"], rows),
            saturation(levels, {level: median["direct", level] for level in levels}),
            f"Replies other than the scripted one: {unexpected}. {bridge.problems()}."
            + (f" First errors: {first_errors}" if first_errors else ""),
        ])


if __name__ == "__main__":
    main()
