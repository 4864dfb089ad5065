"""Completed turns per second with many viewers at once: through the bridge vs straight to Letta.

At each concurrency level C, C viewers talk without pause, each sending its next turn as soon as
its reply is in (a closed loop). A block runs one side at one level: it starts every viewer, waits
until each has had a reply (the pipeline is full), counts the turns of the next `--window` seconds,
then stops sending and lets the turns in flight finish. Ramp-up and drain never enter the figure.

Sides (`--sides`):
  bridge             LPUSH on letta_requests -> reply on letta_responses, through a real
                     `vtuber-letta bridge` with its defaults (streaming on, VTL_BRIDGE_CONCURRENCY)
  bridge-unstreamed  the same with VTL_BRIDGE_STREAMING=false
  direct             one asyncio task per viewer, plain `messages.create`
  direct-streamed    the same with streaming=True, stream_tokens=True
  bridge-mix         the bridge with its defaults, on a realistic mix of turns: of every 10 turns of a
                     viewer, 5 plain, 3 with an avatar cue (set_expression) and 2 with a memory write
                     (remember_viewer_fact), each written beside the reply in one response
Each bridge block runs its own bridge process. Each round runs every side once per level, back to
back, the order rotating from round to round; a ratio is taken within a round (the same minutes of
the same machine) and the median over rounds is reported. Pairs that make the same Letta call
(bridge / direct-streamed, bridge-unstreamed / direct) show what the bridge itself costs;
bridge / direct is what a client switching to the bridge with its defaults sees.

CPU per turn (from /proc, local stack only) says whose work a gap is: Letta's own per-turn cost,
or something of ours competing with Letta for the cores.

`--letta-workers 1,2` runs every side at every level once per Letta worker count in each round,
Letta restarted with that many uvicorn workers in between (the order alternating from round to
round), each bridge told the same count (VTL_LETTA_WORKERS, so its concurrency follows it); a side
is then reported as e.g. `bridge@2w`, and `bridge@2w / bridge@1w` is what the second worker pays."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from bench.common import (
    PLAIN_REPLY,
    TURN_WAIT_S,
    Bridge,
    BridgeSender,
    DirectSender,
    bench_stack,
    ensure_agents,
    log,
    ms,
    p50,
    parse,
    parser,
    problem_counts,
    problems_since,
    report,
    restart_letta_with_workers,
    run_id,
    scripted_rules,
    table,
)
from bench.cpu import CpuMeter

FULL = {"levels": "1,8,32,128", "window": 30.0, "rounds": 5, "sides": "bridge,bridge-unstreamed,direct,direct-streamed"}
QUICK = {"levels": "1,4,8", "window": 8.0, "rounds": 2, "sides": "bridge,direct"}
BRIDGE_KNOBS = {"bridge": {}, "bridge-unstreamed": {"VTL_BRIDGE_STREAMING": "false"}, "bridge-mix": {}}
DIRECT_STREAMING = {"direct": False, "direct-streamed": True}
SIDES = (*BRIDGE_KNOBS, *DIRECT_STREAMING)
# (side, other, what the ratio means), reported when both sides ran
PAIRS = (
    ("bridge", "direct-streamed", "the same Letta call (a token stream): the bridge's own cost"),
    ("bridge-unstreamed", "direct", "the same Letta call (plain): the bridge's own cost"),
    ("bridge", "direct", "the bridge's defaults vs plain sends: what a client switching to the bridge sees"),
    ("bridge-mix", "bridge", "50 % plain / 30 % avatar cue / 20 % memory write vs plain turns, both through the bridge"),
)
MIX = ("plain",) * 5 + ("cue",) * 3 + ("mem",) * 2  # of every 10 turns of one viewer


def mix_rules() -> list[dict]:
    """The scripted model's answers to the mix's marked turns (the reply itself stays PLAIN_REPLY)."""
    return [
        {"name": "mix-cue", "when": {"user_contains": "[cue]"},
         "then": {"reply": PLAIN_REPLY, "tool_calls": [{"name": "set_expression", "arguments": {"expression": "happy"}}]}},
        {"name": "mix-mem", "when": {"user_regex": r"\[mem\] (?P<n>\S+)"},
         "then": {"reply": PLAIN_REPLY, "tool_calls": [
             {"name": "remember_viewer_fact", "arguments": {"fact": "likes game {n}", "category": "games"}}]}},
    ]


def turn_text(side: str, index: int, turn: int) -> str:
    text = f"第{turn}条：主播晚上好！"
    if side != "bridge-mix":
        return text
    kind = MIX[(index + turn) % len(MIX)]  # viewers start at different points of the cycle
    return text if kind == "plain" else f"[{kind}] v{index}t{turn} {text}"
PLATEAU = 0.90  # "stops growing": a level within 10 % of the best level's turns/s
SETTLE_S = 2.0  # Letta finishes a turn's bookkeeping after its reply: let it, before the next block
CPU_PARTS = ("letta", "postgres", "model", "redis", "bridge", "client")


@dataclass
class Block:
    """One side at one level: what was counted in the window and what each part's CPU did meanwhile."""

    tps: float
    turns: float  # turns in the window, counted fractionally (see cycles_between)
    latencies: list[float]
    errors: list[str]
    cpu_ms_per_turn: dict[str, float] = field(default_factory=dict)


def cycles_between(arrivals: list[float], start: float, end: float) -> float:
    """How many of one viewer's turns fall in [start, end], counting the turn in progress at either
    edge by the part of it that lies inside (its progress taken as linear between two replies).

    Needs a reply at or before `start` and one after `end`. Counting whole replies instead would be
    quantized: viewers who start together stay in step (Letta serves their turns side by side), so
    replies come in waves of C, and a window holds a whole number of waves, give or take one."""
    def progress(t: float) -> float:
        for k in range(1, len(arrivals)):
            if arrivals[k] > t:
                return k - 1 + (t - arrivals[k - 1]) / (arrivals[k] - arrivals[k - 1])
        raise ValueError("no reply after the window")
    return progress(end) - progress(start)


async def steady_block(send, viewers: list[str], window: float, meter: CpuMeter | None,
                       text_of=lambda index, turn: f"第{turn}条：主播晚上好！") -> Block:
    """Every viewer in a closed loop (the next turn as soon as the reply is in); the window starts
    once every viewer has had a reply, and ends with each viewer's turn then in flight finishing."""
    arrivals: list[list[tuple[float, float]]] = [[] for _ in viewers]  # per viewer: (arrival, latency)
    errors: list[str] = []
    window_end: float | None = None

    async def viewer(index: int, viewer_id: str) -> None:
        turn = 0
        # Until a reply after the window's end: the far edge of cycles_between.
        while window_end is None or not arrivals[index] or arrivals[index][-1][0] <= window_end:
            try:
                latency = await send(index, viewer_id, text_of(index, turn))
                arrivals[index].append((time.perf_counter(), latency))
            except Exception as exc:  # counted and shown: an error is a result, not a crash
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                if len(errors) > 10 * len(viewers):
                    raise
                await asyncio.sleep(1.0)  # a failing side must not spin
            turn += 1

    async def all_replied() -> None:
        while not all(arrivals):
            await asyncio.sleep(0.05)

    loops = [asyncio.create_task(viewer(i, v)) for i, v in enumerate(viewers)]
    try:
        await asyncio.wait_for(all_replied(), TURN_WAIT_S)
        before = meter.snapshot() if meter else None
        started = time.perf_counter()
        await asyncio.sleep(window)
        ended = window_end = time.perf_counter()
        after = meter.snapshot() if meter else None
        await asyncio.gather(*loops)  # each viewer's turn in flight finishes: the window's far edge
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    turns = sum(cycles_between([t for t, _ in own], started, ended) for own in arrivals)
    latencies = [latency for own in arrivals for t, latency in own if started <= t < ended]
    block = Block(tps=turns / (ended - started), turns=turns, latencies=latencies, errors=errors)
    if before is not None and turns:
        block.cpu_ms_per_turn = {part: used * 1000 / turns for part, used in CpuMeter.used(before, after).items()}
    await asyncio.sleep(SETTLE_S)
    return block


def label(side: str, workers: int, worker_counts: list[int]) -> str:
    """A side's name in the results: `bridge`, or `bridge@2w` when several worker counts ran."""
    return side if len(worker_counts) == 1 else f"{side}@{workers}w"


def bridge_concurrency(settings, args, workers: int) -> int:
    """What the bridge of a block runs at: --bridge-concurrency, else its default for `workers`."""
    return args.bridge_concurrency or min(256, settings.bridge_concurrency_per_letta_worker * workers)


async def run_block(settings, args, side: str, level: int, viewers: list[str], agents: dict[str, str],
                    listener: BridgeSender, directs: dict[str, DirectSender], workers: int) -> Block:
    """One block; a bridge side gets a bridge process of its own for the block."""
    if side in directs:
        direct = directs[side]
        send = lambda i, v, text: direct.turn(agents[v], text, slot=i)  # noqa: E731
        return await steady_block(send, viewers[:level], args.window, CpuMeter(settings))
    # The bridge is told Letta's worker count (its default concurrency follows it) unless the
    # concurrency is given.
    knobs = {"VTL_LETTA_WORKERS": workers, "VTL_BRIDGE_CONCURRENCY": args.bridge_concurrency, **BRIDGE_KNOBS[side]}
    bridge = Bridge(settings, args.reuse_stack, **knobs)
    await asyncio.to_thread(bridge.__enter__)
    try:
        meter = CpuMeter(settings, bridge=bridge.proc.pid)
        return await steady_block(lambda i, v, text: listener.turn(v, text), viewers[:level], args.window, meter,
                                  text_of=lambda index, turn: turn_text(side, index, turn))
    finally:
        await asyncio.to_thread(bridge.__exit__)


async def measure(settings, args, levels, sides, worker_counts) -> tuple[dict, int]:
    labels = [(side, w, label(side, w, worker_counts)) for w in worker_counts for side in sides]
    results: dict[tuple[str, int], list[Block]] = {(name, level): [] for _, _, name in labels for level in levels}
    rid = run_id()
    unexpected, running = 0, settings.letta_workers
    async with BridgeSender(settings) as listener:
        for rnd in range(args.rounds):
            # Fresh agents every round: Letta's cost per turn grows with an agent's history (the
            # one viewer of level 1 alone gets ~100 turns a block), so rounds stay comparable.
            viewers = {name: [f"bench:tp-{name}-{rid}-r{rnd}-{i}" for i in range(max(levels))] for _, _, name in labels}
            started = time.perf_counter()
            agents = {name: await asyncio.to_thread(ensure_agents, settings, viewers[name]) for _, _, name in labels}
            log(f"round {rnd + 1}/{args.rounds}: {sum(map(len, agents.values()))} agents ready in "
                f"{time.perf_counter() - started:.0f}s")
            for workers in (worker_counts if rnd % 2 == 0 else worker_counts[::-1]):
                if workers != running:
                    await asyncio.to_thread(restart_letta_with_workers, settings, workers)
                    running = workers
                # Per worker count: a restarted Letta would leave a client's pooled connections dead.
                directs = {side: DirectSender(settings, concurrency=max(levels), streaming=DIRECT_STREAMING[side])
                           for side in sides if side in DIRECT_STREAMING}
                try:
                    for li, level in enumerate(levels):
                        shift = (rnd + li) % len(sides)
                        order = sides[shift:] + sides[:shift]
                        for side in (order if rnd % 2 == 0 else order[::-1]):
                            name = label(side, workers, worker_counts)
                            block = await run_block(settings, args, side, level, viewers[name], agents[name],
                                                    listener, directs, workers)
                            results[name, level].append(block)
                            letta = block.cpu_ms_per_turn.get("letta")
                            log(f"round {rnd + 1}/{args.rounds} level {level:>3} {name:<17}: {block.tps:.2f} turns/s, "
                                f"turn p50 {ms(p50(block.latencies))} ms, {block.turns:.1f} turns"
                                + (f", Letta {letta:.0f} ms CPU/turn" if letta is not None else "")
                                + (f", {len(block.errors)} errors" if block.errors else ""))
                finally:
                    unexpected += sum(d.unexpected for d in directs.values())
                    for direct in directs.values():
                        await direct.close()
        unexpected += listener.unexpected
    return results, unexpected


def worker_pairs(sides: list[str], worker_counts: list[int]) -> list[tuple[str, str, str]]:
    """The ratios to report: the side pairs within each worker count, and each side's most workers
    vs its fewest."""
    pairs = [(label(a, w, worker_counts), label(b, w, worker_counts), meaning)
             for w in worker_counts for a, b, meaning in PAIRS if a in sides and b in sides]
    if len(worker_counts) > 1:
        few, many = min(worker_counts), max(worker_counts)
        pairs += [(label(side, many, worker_counts), label(side, few, worker_counts),
                   f"{many} Letta workers vs {few}: what the extra worker(s) pay") for side in sides]
    return pairs


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


def round_ratios(results, side: str, other: str, level: int) -> list[float]:
    """side/other turns/s within each round (the two blocks ran minutes apart at most)."""
    return [b.tps / d.tps for b, d in zip(results[side, level], results[other, level]) if d.tps]


def tps_table(results, levels, sides) -> str:
    headers = ["viewers", *(f"{side} turns/s" for side in sides), *(f"{side} p50 turn ms" for side in sides), "errors"]
    rows = []
    for level in levels:
        rows.append([level, *(f"{p50([b.tps for b in results[side, level]]):.2f}" for side in sides),
                     *(ms(p50([x for b in results[side, level] for x in b.latencies])) for side in sides),
                     " / ".join(str(sum(len(b.errors) for b in results[side, level])) for side in sides)])
    return table(headers, rows)


def ratio_table(results, levels, pairs) -> str | None:
    if not pairs:
        return None
    rows = []
    for side, other, meaning in pairs:
        for level in levels:
            ratios = round_ratios(results, side, other, level)
            rows.append([f"{side} / {other}", level, f"**{p50(ratios):.2f}**" if ratios else "n/a",
                         f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "n/a",
                         sum(r >= 0.95 for r in ratios), len(ratios), meaning])
    return table(["ratio", "viewers", "median of rounds", "range over rounds", "rounds ≥ 0.95", "rounds", "meaning"],
                 rows)


def cpu_table(results, levels, sides) -> str | None:
    if not any(b.cpu_ms_per_turn for blocks in results.values() for b in blocks):
        return None
    rows = []
    for level in levels:
        for side in sides:
            blocks = [b for b in results[side, level] if b.cpu_ms_per_turn]
            rows.append([level, side, *(ms(p50([b.cpu_ms_per_turn.get(part, 0.0) for b in blocks]) / 1000)
                                        if blocks else "n/a" for part in CPU_PARTS)])
    return table(["viewers", "side", *(f"{part} ms" for part in CPU_PARTS)], rows)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--levels", help=f"concurrent viewers, comma separated (default {FULL['levels']}, quick {QUICK['levels']})")
    p.add_argument("--window", type=float, help=f"seconds of steady state counted per block (default {FULL['window']:.0f})")
    p.add_argument("--rounds", type=int, help=f"rounds (each side once per level per round; default {FULL['rounds']})")
    p.add_argument("--sides", help=f"comma separated, of {', '.join(SIDES)} (default all; quick {QUICK['sides']})")
    p.add_argument("--bridge-concurrency", type=int, help="VTL_BRIDGE_CONCURRENCY of the bridge (default: its own "
                   "default, which follows Letta's workers)")
    p.add_argument("--letta-workers", help="Letta uvicorn worker counts to compare, comma separated, e.g. 1,2 (Letta "
                   "is restarted with each; default: the stack's own VTL_LETTA_WORKERS)")
    args = parse(p, FULL, QUICK)
    levels = sorted({int(x) for x in args.levels.split(",")})
    sides = [side.strip() for side in args.sides.split(",")]
    if unknown := set(sides) - set(SIDES):
        p.error(f"--sides: unknown side(s) {', '.join(sorted(unknown))} (of {', '.join(SIDES)})")
    try:
        worker_counts = sorted({int(x) for x in args.letta_workers.split(",")}) if args.letta_workers else []
    except ValueError:
        p.error(f"--letta-workers: whole numbers, comma separated (got {args.letta_workers!r})")
    if any(w < 1 for w in worker_counts):
        p.error("--letta-workers: at least 1 worker")
    with bench_stack(args.reuse_stack) as settings, scripted_rules(settings, mix_rules() if "bridge-mix" in sides else []):
        worker_counts = worker_counts or [settings.letta_workers]
        labels = [label(side, w, worker_counts) for w in worker_counts for side in sides]
        problems_before = problem_counts(settings)
        try:
            results, unexpected = asyncio.run(measure(settings, args, levels, sides, worker_counts))
        finally:
            if args.reuse_stack and worker_counts != [settings.letta_workers]:
                restart_letta_with_workers(settings, settings.letta_workers)  # the stack as it was
        problems = problems_since(settings, problems_before)
        first_errors = [e for blocks in results.values() for b in blocks for e in b.errors][:3]
        direct_tps = ({level: p50([b.tps for b in results[label("direct", worker_counts[0], worker_counts), level]])
                       for level in levels} if "direct" in sides else None)
        ratios = ratio_table(results, levels, worker_pairs(sides, worker_counts))
        cpu = cpu_table(results, levels, labels)
        concurrency = ", ".join(f"{bridge_concurrency(settings, args, w)} with {w} Letta worker{'s' * (w > 1)}"
                                for w in worker_counts)
        report("Throughput: many viewers at once, bridge vs direct", settings, args.reuse_stack, [
            f"Bridge: a `vtuber-letta bridge` process per block, VTL_BRIDGE_CONCURRENCY={concurrency}. "
            f"Turns/s: turns completed in a {args.window:.0f} s steady-state window (every viewer already "
            f"answered once; ramp-up and drain not counted); median of {args.rounds} round(s), each with agents "
            "of its own (new ones every round, so that histories stay short alike).",
            tps_table(results, levels, labels),
            *([f"Ratios, each taken within one round:\n\n{ratios}"] if ratios else []),
            *([saturation(levels, direct_tps)] if direct_tps else []),
            *([f"CPU per completed turn in the window, by part (median of rounds; `client` is this script: the "
               f"listener on the bridge sides, the letta-client on the direct sides):\n\n{cpu}"] if cpu else []),
            f"Replies other than the scripted one: {unexpected}. {problems}."
            + (f" First errors: {first_errors}" if first_errors else ""),
        ])


if __name__ == "__main__":
    main()
