"""Real turns through the bridge: a plain reply vs turns that change her face, play a gesture or write
a memory, interleaved in one run, each kind on its own viewer's agent.

The scripted model answers each kind the way a model that writes its reply beside its tool calls
does (text and calls in one response); `expression, cue first` is the other common shape (the call
alone, the words in the next step). Reported per kind: the whole reply handed to speech (LPUSH ->
its TTS request taken off tts_requests, as the host's TTS service takes it), the turn's end (LPUSH
-> letta_responses: the final record, after the tools ran), the avatar cue (LPUSH -> its
AvatarEvent on live2d_events: when the face changes; the bridge publishes it as soon as the model
has written the call) and the first sentence (LPUSH -> the first chunk on letta_response_chunks),
p50/p95; model calls
per turn (counted at the model endpoint); sandbox runs per turn (tool returns in the agent's
history); Letta's CPU per turn (bench/cpu.py). `--model-latency-ms` and `--tokens-per-second` make
the scripted model answer like a hosted one (both 0: it answers at once)."""

from __future__ import annotations

import asyncio
import time

from bench.common import Bridge, bench_stack, ensure_agents, log, model_calls, ms, p50, p95, parse, parser, ratio, report, run_id, scripted_rules, table
from bench.cpu import CpuMeter
from bench.published import Published
from vtuber_letta.letta_api import letta_client

FULL = {"rounds": 30, "warmup": 2, "settle_ms": 300}
QUICK = {"rounds": 6, "warmup": 1, "settle_ms": 300}
REPLY = "好呀，我记住啦！今天也要开心哦。"

# kind -> the tool calls the model writes beside its reply ({n}: the turn's number, so facts differ).
KINDS: dict[str, list[tuple[str, dict]]] = {
    "plain": [],
    "expression": [("set_expression", {"expression": "happy"})],
    "expression + motion": [("set_expression", {"expression": "happy"}), ("play_motion", {"motion": "wave"})],
    "remember": [("remember_viewer_fact", {"fact": "likes game number {n}", "category": "games"})],
    "remember + expression": [("remember_viewer_fact", {"fact": "likes song number {n}", "category": "songs"}),
                              ("set_expression", {"expression": "happy"})],
    "stay_silent": [("stay_silent", {"reason": "spam"})],
    "expression, cue first": [("set_expression", {"expression": "surprised"})],
}
CUE_FIRST = "expression, cue first"


def rules(pacing: dict) -> list[dict]:
    """One rule per kind, chosen by a marker in the viewer's text; cue-first answers its words next."""
    out = [{"name": "after-cue", "when": {"after_tool": "set_expression", "user_contains": marker(CUE_FIRST)},
            "then": {"reply": REPLY, **pacing}}]
    for index, (kind, calls) in enumerate(KINDS.items()):
        then: dict = {**pacing}
        if calls:
            then["tool_calls"] = [{"name": name, "arguments": args} for name, args in calls]
        if kind not in ("stay_silent", CUE_FIRST):
            then["reply"] = REPLY
        out.append({"name": f"kind-{index}", "when": {"user_regex": rf"\[k{index}\] (?P<n>\d+)"}, "then": then})
    return out


def marker(kind: str) -> str:
    return f"[k{list(KINDS).index(kind)}]"


async def measure(settings, args, viewers: dict[str, str], meter: CpuMeter):
    full: dict[str, list[float]] = {k: [] for k in KINDS}
    speech: dict[str, list[float]] = {k: [] for k in KINDS}
    first: dict[str, list[float]] = {k: [] for k in KINDS}
    cue: dict[str, list[float]] = {k: [] for k in KINDS}
    calls: dict[str, list[int]] = {k: [] for k in KINDS}
    cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    unexpected = 0
    kinds = list(KINDS)
    async with Published(settings, watch_speech=True, watch_avatar=True) as published:
        for round_no in range(args.warmup + args.rounds):
            timed = round_no >= args.warmup
            # Rotate the order so no kind always follows the same other kind.
            shift = round_no % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                await asyncio.sleep(args.settle_ms / 1000)  # Letta goes on working after [DONE]
                before_calls, before_cpu = model_calls(settings), meter.snapshot()
                task = await published.push(viewers[kind], f"{marker(kind)} {round_no} 你好")
                await published.wait_final([task], 120)
                await asyncio.sleep(args.settle_ms / 1000)  # a plain turn's TTS request comes with FINISH
                seen = published.tasks.pop(task)
                arrived, body = seen.final
                used = CpuMeter.used(before_cpu, meter.snapshot())
                if not timed:
                    continue
                full[kind].append(arrived - seen.pushed)
                if seen.speech:  # the whole reply is with speech once its last request is
                    speech[kind].append(max(t for t, _ in seen.speech) - seen.pushed)
                if seen.chunks:
                    first[kind].append(seen.chunks[0][0] - seen.pushed)
                if seen.avatar:  # the first cue: when the face starts to change
                    cue[kind].append(seen.avatar[0][0] - seen.pushed)
                calls[kind].append(model_calls(settings) - before_calls)
                cpu[kind].append(used.get("letta", 0.0))
                expected_silent = kind == "stay_silent"
                if bool(body.get("silent")) != expected_silent or (not expected_silent and body.get("response_text") != REPLY):
                    unexpected += 1
                    log(f"unexpected reply for {kind}: {body}")
    return full, speech, first, cue, calls, cpu, unexpected


def sandbox_runs(settings, agent_id: str) -> int:
    """Tool returns in the agent's history: one per sandbox run (several calls of one step share a message)."""
    client = letta_client(settings)
    return sum(len(getattr(m, "tool_returns", None) or [m]) for m in client.agents.messages.list(agent_id, limit=1000).items
               if m.message_type == "tool_return_message")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, help=f"timed turns per kind (default {FULL['rounds']}, quick {QUICK['rounds']})")
    p.add_argument("--warmup", type=int, help="untimed rounds first")
    p.add_argument("--settle-ms", type=int, help="idle pause before and after every turn (default 300)")
    p.add_argument("--model-latency-ms", type=int, default=0, help="the scripted model waits this long per call")
    p.add_argument("--tokens-per-second", type=float, default=0, help="the scripted model streams at this pace")
    args = parse(p, FULL, QUICK)
    pacing = {}
    if args.model_latency_ms:
        pacing["delay_ms"] = args.model_latency_ms
    if args.tokens_per_second:
        pacing["tokens_per_second"] = args.tokens_per_second
    with bench_stack(args.reuse_stack) as settings, scripted_rules(settings, rules(pacing)):
        rid = run_id()
        viewers = {kind: f"bench:tools-{i}-{rid}" for i, kind in enumerate(KINDS)}
        agents = ensure_agents(settings, list(viewers.values()))
        with Bridge(settings, args.reuse_stack) as bridge:
            meter = CpuMeter(settings, bridge=bridge.proc.pid)
            log(f"{args.warmup} warm-up + {args.rounds} timed rounds of {len(KINDS)} kinds, interleaved")
            started = time.perf_counter()
            full, speech, first, cue, calls, cpu, unexpected = asyncio.run(measure(settings, args, viewers, meter))
            log(f"measured in {time.perf_counter() - started:.0f}s")
        runs = {kind: sandbox_runs(settings, agents[viewers[kind]]) / (args.rounds + args.warmup) for kind in KINDS}
        plain = {"speech": p50(speech["plain"]), "full": p50(full["plain"]), "first": p50(first["plain"])}

        def cells(samples: list[float], base: float, *, with_p95: bool = False) -> list[str]:
            if not samples:
                return ["—", "—"] + (["—"] if with_p95 else [])
            return [ms(p50(samples))] + ([ms(p95(samples))] if with_p95 else []) + [ratio(p50(samples), base)]

        rows = []
        for kind in KINDS:
            rows.append([kind, len(full[kind]), *cells(speech[kind], plain["speech"], with_p95=True),
                         *cells(full[kind], plain["full"], with_p95=True),
                         *cells(cue[kind], plain["full"], with_p95=True), *cells(first[kind], plain["first"]),
                         f"{p50(calls[kind]):.0f} ({max(calls[kind])})", f"{runs[kind]:.1f}",
                         ms(p50(cpu[kind]))])
        latency = (f"model latency {args.model_latency_ms} ms per call, {args.tokens_per_second:g} tokens/s"
                   if pacing else "the scripted model answers at once")
        report(f"Tool turns through the bridge ({latency})", settings, args.reuse_stack,
               scripted="each kind: its reply and its tool calls in one response", sections=[
            table(["turn", "n", "reply to speech p50 ms", "p95", "× plain p50", "turn end p50 ms", "p95", "× plain",
                   "avatar cue p50 ms", "p95", "× plain turn end", "first sentence p50 ms", "× plain", "model calls p50 (max)", "sandbox runs / turn",
                   "Letta CPU / turn ms"], rows),
            f"Replies other than the scripted one: {unexpected}. {bridge.problems()}.",
        ])


if __name__ == "__main__":
    main()
