"""Time to first sentence: with streaming on, how long from a task's LPUSH until its first
sentence is published on `letta_response_chunks`, against the time until its whole reply is
published on `letta_responses`. The scripted model answers a 10-sentence reply slowly, token by
token (default 20 tokens/s, ~3 s of speech-sized text), as a real model would.

In the same run, interleaved in blocks, a bridge with streaming off answers the same turns: its
full-reply time is when the first audio could start without streaming (and shows what streaming
costs the full reply, if anything)."""

from __future__ import annotations

import asyncio

from bench.common import Bridge, _http_json, bench_stack, ensure_agents, log, ms, p50, p95, parse, parser, ratio, report, run_id, table
from bench.published import Published

FULL = {"rounds": 6, "turns": 4, "tokens_per_second": 20.0}
QUICK = {"rounds": 2, "turns": 2, "tokens_per_second": 20.0}
TEN_SENTENCES = " ".join(
    f"This is sentence number {n} of my answer." for n in
    ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
)


async def block(settings, viewer: str, turns: int, *, streaming: bool) -> list[tuple[float, float, int]]:
    """(first sentence s, full reply s, chunks) per turn; first sentence = full reply when not streaming."""
    out = []
    async with Published(settings) as published:
        for i in range(turns):
            task_id = await published.push(viewer, f"Tell me a long story, part {i}.")
            await published.wait_final([task_id])
            seen = published.tasks[task_id]
            full = seen.final[0] - seen.pushed
            if seen.final[1].get("response_text") != TEN_SENTENCES:
                raise RuntimeError(f"unexpected reply: {seen.final[1]!r}")
            first = seen.chunks[0][0] - seen.pushed if streaming else full
            if streaming and not seen.chunks:
                raise RuntimeError("streaming is on but no chunk was published")
            out.append((first, full, len(seen.chunks)))
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, help="blocks per side, alternating (streaming on, off, on, ...)")
    p.add_argument("--turns", type=int, help="turns per block")
    p.add_argument("--tokens-per-second", type=float, help="the scripted model's pace")
    args = parse(p, FULL, QUICK)
    with bench_stack(args.reuse_stack) as settings:
        model = f"http://127.0.0.1:{settings.scripted_model_port}/_script/rules"
        _http_json("PUT", model, [{"name": "bench-long", "when": {},
                                   "then": {"reply": TEN_SENTENCES, "tokens_per_second": args.tokens_per_second}}])
        rid = run_id()
        viewers = {True: f"bench:ttfs-on-{rid}", False: f"bench:ttfs-off-{rid}"}
        ensure_agents(settings, list(viewers.values()))
        results: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
        problems = []
        for round_no in range(args.rounds):
            for streaming in ((True, False) if round_no % 2 == 0 else (False, True)):
                with Bridge(settings, args.reuse_stack, VTL_BRIDGE_STREAMING=str(streaming).lower()) as bridge:
                    log(f"round {round_no + 1}/{args.rounds}: streaming {'on' if streaming else 'off'}")
                    results[streaming] += asyncio.run(block(settings, viewers[streaming], args.turns, streaming=streaming))
                    problems.append(bridge.problems())
        on, off = results[True], results[False]
        first_on, full_on, full_off = [x[0] for x in on], [x[1] for x in on], [x[1] for x in off]
        shares = [first / full for first, full, _ in on]
        rows = [
            ["streaming on: first sentence published", len(on), ms(p50(first_on)), ms(p95(first_on))],
            ["streaming on: whole reply published", len(on), ms(p50(full_on)), ms(p95(full_on))],
            ["streaming off: whole reply (= first audio)", len(off), ms(p50(full_off)), ms(p95(full_off))],
        ]
        compare = [
            ["first sentence / whole reply (streaming on, per turn)", f"{p50(shares):.1%}", f"{p95(shares):.1%}"],
            ["first sentence (on) / first audio without streaming (off)", ratio(p50(first_on), p50(full_off)), ""],
            ["whole reply: on / off", ratio(p50(full_on), p50(full_off)), ""],
        ]
        report("Time to first sentence (streaming)", settings, args.reuse_stack, [
            f"Reply: 10 sentences, {len(TEN_SENTENCES.split())} tokens at {args.tokens_per_second:g} tokens/s; "
            f"chunks per reply (median): {p50([x[2] for x in on]):.0f}.",
            table(["measure", "n", "p50 ms", "p95 ms"], rows),
            table(["ratio", "p50", "p95"], compare),
            "; ".join(sorted(set(problems))) + ".",
        ], scripted=f"a 10-sentence reply streamed at {args.tokens_per_second:g} tokens/s")


if __name__ == "__main__":
    main()
