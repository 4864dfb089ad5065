"""Long-term recall: questions about facts told 1, 10 and 50 streams earlier, on viewers with 50 and
500 facts; the prompt size per turn; a turn that searches the tier against a plain turn.

The conversation set is ours and synthetic (`conversation_set`, deterministic, nothing downloaded):
each viewer owns things ("has a shiny teal kite named Rumiko") told over a number of streams, and
is asked "what did I name my shiny teal kite?" about a fact told `age` streams before the last one.
Facts are stored through the real memory gate, as remember_viewer_fact stores them (the model's own
choice of what to remember is not measured here); the questions are real Letta turns.

- Each question is asked twice, interleaved with plain turns: through the bridge's Letta half
  (bridge/letta_turns.py) with recall before the turn (bridge/recall_prefetch.py: the passages
  closest to the message go with it) and without (the model must call recall_viewer_facts).
- With the scripted model the model answers at once when the note came with the question, and
  otherwise calls recall_viewer_facts with the question's words and answers with what it got; a
  question counts as recalled when its answer reached the model's prompt (core block, note or
  tool result): the mechanics of both tiers.
- With your own model (`--reuse-stack` on a stack configured with OPENAI_BASE_URL/LETTA_MODEL, see
  the README) the model decides; a question counts as recalled when the answer is in her reply.

Reported: recalled / asked per age, viewer size and path, the prompt of a plain turn (characters
the model is sent, scripted model only) for each viewer size with and without the note, and p50/p95
of each kind of turn against a plain turn without recall on the same viewer, interleaved."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time

from bench.common import (
    LETTA_TIMEOUT_S,
    _http_json,
    bench_stack,
    ensure_agents,
    log,
    model_calls,
    ms,
    p50,
    p95,
    parse,
    parser,
    ratio,
    report,
    run_id,
    scripted_rules,
    table,
)
from bridge.gateway import TurnMessage
from bridge.letta_turns import LettaTurns
from bridge.recall_prefetch import RecallPrefetch
from tools.gate_client import GateClient
from tools.memory_tiers import PREFETCH_HEADER, PREFETCH_MAX_CHARS
from vtuber_letta.letta_api import async_letta_client

FULL = {"streams": 50, "facts_per_stream": 10, "small_streams": 5, "ages": "1,10,50", "per_age": 10,
        "model_delay_ms": "0,300"}
QUICK = {"streams": 12, "facts_per_stream": 8, "small_streams": 3, "ages": "1,12", "per_age": 2, "model_delay_ms": "0"}

ADJECTIVES = ("tiny", "huge", "shiny", "fluffy", "ancient")
COLOURS = ("red", "blue", "green", "amber", "violet", "silver", "golden", "pink", "teal", "crimson")
THINGS = ("teapot", "kite", "lantern", "marble", "scarf", "robot", "cactus", "puzzle", "comic", "bicycle")
SYLLABLES = ("ka", "lo", "mi", "ru", "te", "shi", "na", "po", "ze", "yu")
QUESTION = "what did I name my {thing}?"
QUESTION_REGEX = r"what did I name my (?P<q>[^?]+)\?"
PLAIN_TEXT = "how is the stream going today?"


def name_for(viewer: int, index: int) -> str:
    """A made-up name, unique per viewer and fact (the answer to look for)."""
    digits = f"{viewer % 10}{index:03d}"
    return "".join(SYLLABLES[int(d)] for d in digits).capitalize()


def conversation_set(viewer: int, streams: int, per_stream: int) -> list[list[tuple[str, str, str]]]:
    """Per stream, the facts told: (thing, fact, answer). Deterministic for (viewer, streams, per_stream)."""
    things = [f"{a} {c} {t}" for a, c, t in itertools.product(ADJECTIVES, COLOURS, THINGS)]
    random.Random(viewer).shuffle(things)
    told = [(thing, f"has a {thing} named {name_for(viewer, i)}", name_for(viewer, i))
            for i, thing in enumerate(things[: streams * per_stream])]
    return [told[s * per_stream:(s + 1) * per_stream] for s in range(streams)]


def rules(delay_ms: int = 0) -> list[dict]:
    """The model's part; every answer after delay_ms (0: at once), plain turns included."""
    plain = {"name": "recall-plain", "when": {"user_contains": PLAIN_TEXT}, "then": {"reply": "Going great, thanks!"}}
    listed = [
        {"name": "recall-answer", "when": {"after_tool": "recall_viewer_facts"}, "then": {"reply": "{tool_result}"}},
        # The note recall-before-turn sends with this message: a real model answers from it at once.
        {"name": "recall-noted", "when": {"user_regex": QUESTION_REGEX, "turn_contains": PREFETCH_HEADER},
         "then": {"reply": "I remember! (answered from the note)"}},
        {"name": "recall-ask", "when": {"user_regex": QUESTION_REGEX},
         "then": {"tool_calls": [{"name": "recall_viewer_facts", "arguments": {"query": "{q}"}}]}},
        plain,
    ]
    for rule in listed:
        rule["then"]["delay_ms"] = delay_ms
    return listed


def use_rules(settings, delay_ms: int) -> None:
    """Replace the rules this bench put on the scripted model (they are the newest, listed first)."""
    url = f"http://127.0.0.1:{settings.scripted_model_port}/_script/rules"
    ours = {rule["name"] for rule in rules()}
    kept = [rule for rule in _http_json("GET", url)["rules"] if rule.get("name") not in ours]
    _http_json("PUT", url, rules(delay_ms) + kept)


def last_prompts(settings, count: int) -> list[str]:
    """What the scripted model was sent in its last `count` calls (messages as JSON text)."""
    url = f"http://127.0.0.1:{settings.scripted_model_port}/_script/requests?limit={count}"
    return [json.dumps(entry["messages"], ensure_ascii=False) for entry in _http_json("GET", url)["requests"]]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--streams", type=int, help="streams told to the large viewer (default 50)")
    p.add_argument("--facts-per-stream", type=int, help="facts told per stream (default 10)")
    p.add_argument("--small-streams", type=int, help="streams told to the small viewer (default 5: 50 facts)")
    p.add_argument("--ages", help="ages asked about, in streams before the last (default 1,10,50)")
    p.add_argument("--per-age", type=int, help="questions per age and viewer (default 10)")
    p.add_argument("--model-delay-ms",
                   help="the scripted model's latency per answer, each interleaved per question (default 0,300)")
    args = parse(p, FULL, QUICK)
    ages = [int(a) for a in args.ages.split(",")]
    delays = [int(d) for d in args.model_delay_ms.split(",")]
    with bench_stack(args.reuse_stack) as settings, scripted_rules(settings, rules()):
        rid = run_id()
        sizes = {"large": args.streams, "small": args.small_streams}
        viewers = {size: f"bench:recall-{size}-{rid}" for size in sizes}
        agents = ensure_agents(settings, list(viewers.values()))
        gate = GateClient.from_settings(settings)
        seq = itertools.count()
        told: dict[str, list] = {}
        for number, (size, streams) in enumerate(sizes.items()):
            told[size] = conversation_set(number, streams, args.facts_per_stream)
            started = time.perf_counter()
            for stream in told[size]:
                for _, fact, _ in stream:
                    answer = gate.remember(agents[viewers[size]], fact, "things")
                    if not answer.startswith("Remembered"):
                        raise SystemExit(f"the gate refused {fact!r}: {answer}")
            count = sum(len(s) for s in told[size])
            log(f"{size} viewer: {count} facts over {streams} streams stored in {time.perf_counter() - started:.0f}s")
        rows, prompt = [], {}
        times = {(delay, kind): [] for delay in delays for kind in TURN_KINDS}
        calls = {(delay, kind): 0 for delay in delays for kind in TURN_KINDS}  # counted at the model
        real = settings.uses_real_model
        with asyncio.Runner() as runner:
            # One per latency: what one delivered is not held back from the other's turns.
            recalls = {delay: NoteSizes(settings.memory_gate_url, settings.memory_gate_secret) for delay in delays}
            turns = {delay: runner.run(_turns(settings, recalls[delay])) for delay in delays}
            for size, streams in sizes.items():
                agent = agents[viewers[size]]
                for age in ages:
                    if age > streams:
                        continue
                    stream = told[size][streams - age]
                    asked = {"note": 0, "tool": 0}
                    hits = {"note": 0, "tool": 0}
                    for thing, _, answer in stream[: args.per_age]:
                        question = QUESTION.format(thing=thing)
                        for delay in delays:
                            if not real:
                                use_rules(settings, delay)
                            # Interleaved, each kind once per question and latency: the tool path
                            # first, so the note recall-before-turn sends is not yet in the history.
                            for kind, text in (("plain", PLAIN_TEXT), ("tool", question),
                                               ("plain+recall", PLAIN_TEXT), ("note", question)):
                                before = 0 if real else model_calls(settings)
                                started = time.perf_counter()
                                result = runner.run(turns[delay][kind].send_turn(
                                    agent, [TurnMessage(f"{rid}-{next(seq)}", text)], sender_name=None))
                                # Timed on the viewer with a tier: the small one has none, so its
                                # questions take the tool path either way (a real model would
                                # answer from the core block).
                                if size == "large":
                                    times[(delay, kind)].append(time.perf_counter() - started)
                                    calls[(delay, kind)] += 0 if real else model_calls(settings) - before
                                if kind in asked and delay == delays[0]:
                                    asked[kind] += 1
                                    where = result.reply_text if real else " ".join(last_prompts(settings, 2))
                                    hits[kind] += answer in where
                                elif kind == "plain" and not real:
                                    prompt.setdefault(size, len(last_prompts(settings, 1)[-1]))
                    for kind, label in (("note", "before the turn"), ("tool", "tool call")):
                        rate = f"{hits[kind] / asked[kind] * 100:.0f} %" if asked[kind] else "n/a"
                        rows.append([f"{size} ({streams * args.facts_per_stream} facts)", age, label, asked[kind],
                                     hits[kind], rate])
            for recall in recalls.values():
                runner.run(recall.aclose())
        scored = "her reply" if real else "the prompt (core block, note or tool result)"
        prompt_rows = [[f"{size} ({sizes[size] * args.facts_per_stream} facts)", prompt.get(size) or "n/a"]
                       for size in sizes]
        notes = [n for recall in recalls.values() for n in recall.sizes]
        report("Long-term recall by the age of a fact", settings, args.reuse_stack,
               scripted="with a note from recall-before-turn, an answer; without, recall_viewer_facts with the "
                        "question's words, then the tool's answer", sections=[
            table(["viewer", "told streams ago", "recalled by", "asked", "recalled", "rate"], rows),
            f"Recalled = the answer was in {scored}.",
            table(["viewer", "prompt of a plain turn (characters)"], prompt_rows),
            f"Notes sent by recall before the turn: {sum(1 for n in notes if n)} of {len(notes)} turns carried one; "
            f"characters per note: p50 {p50([n for n in notes if n] or [0]):.0f}, max {max(notes or [0])} "
            f"(the budget: {PREFETCH_MAX_CHARS}).",
            table(["model latency", "turn", "n", "p50 ms", "p95 ms", "× plain p50", "model calls per turn"], [
                [f"{delay} ms", TURN_KINDS[kind], len(times[(delay, kind)]), ms(p50(times[(delay, kind)])),
                 ms(p95(times[(delay, kind)])), ratio(p50(times[(delay, kind)]), p50(times[(delay, "plain")])),
                 "n/a" if real else f"{calls[(delay, kind)] / max(1, len(times[(delay, kind)])):.2f}"]
                for delay in delays for kind in TURN_KINDS
            ]),
            f"Timed on the large viewer ({sizes['large'] * args.facts_per_stream} facts, most in tier 2). Each question "
            "was asked once per path at the first latency (the recall rates above), and once more per "
            "further latency (the same questions: their answers are in the history then).",
        ])


TURN_KINDS = {
    "plain": "plain, recall before the turn off",
    "plain+recall": "plain, recall before the turn on",
    "note": "question, answered from the note sent with it",
    "tool": "question, recall_viewer_facts (recall before the turn off)",
}


class NoteSizes(RecallPrefetch):
    """RecallPrefetch that keeps the size of every note it hands to a turn (characters)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    async def note_for(self, agent_id, texts):
        note = await super().note_for(agent_id, texts)
        self.sizes.append(len(note) if note else 0)
        return note


async def _turns(settings, recall: RecallPrefetch) -> dict[str, LettaTurns]:
    """The bridge's Letta half (bridge/letta_turns.py), with and without recall before the turn."""
    client = async_letta_client(settings, for_messages=True)
    plain = LettaTurns(client, timeout=LETTA_TIMEOUT_S)
    noted = LettaTurns(client, timeout=LETTA_TIMEOUT_S, recall=recall)
    return {"plain": plain, "tool": plain, "plain+recall": noted, "note": noted}

if __name__ == "__main__":
    main()
