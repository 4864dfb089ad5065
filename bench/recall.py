"""Long-term recall: questions about facts told 1, 10 and 50 streams earlier, on viewers with 50 and
500 facts; the prompt size per turn; a turn that searches the tier against a plain turn.

The conversation set is ours and synthetic (`conversation_set`, deterministic, nothing downloaded):
each viewer owns things ("has a shiny teal kite named Rumiko") told over a number of streams, and
is asked "what did I name my shiny teal kite?" about a fact told `age` streams before the last one.
Facts are stored through the real memory gate, as remember_viewer_fact stores them (the model's own
choice of what to remember is not measured here); the questions are real Letta turns.

- With the scripted model the model always calls recall_viewer_facts with the question's words and
  answers with what it got; a question counts as recalled when its answer reached the model's
  prompt (in the core block or the tool result): the mechanics of both tiers.
- With your own model (`--reuse-stack` on a stack configured with OPENAI_BASE_URL/LETTA_MODEL, see
  the README) the model decides; a question counts as recalled when the answer is in her reply.

Reported: recalled / asked per age and viewer size, the prompt of a plain turn (characters the model
is sent, scripted model only) for each viewer size, and p50/p95 of a recall turn against a plain
turn on the same viewer, interleaved."""

from __future__ import annotations

import itertools
import json
import random
import time

from bench.common import _http_json, _text, bench_stack, ensure_agents, log, ms, p50, p95, parse, parser, ratio, report, run_id, scripted_rules, table
from tools.gate_client import GateClient
from vtuber_letta.letta_api import letta_client

FULL = {"streams": 50, "facts_per_stream": 10, "small_streams": 5, "ages": "1,10,50", "per_age": 10}
QUICK = {"streams": 12, "facts_per_stream": 8, "small_streams": 3, "ages": "1,12", "per_age": 2}

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


def rules() -> list[dict]:
    return [
        {"name": "recall-answer", "when": {"after_tool": "recall_viewer_facts"}, "then": {"reply": "{tool_result}"}},
        {"name": "recall-ask", "when": {"user_regex": QUESTION_REGEX},
         "then": {"tool_calls": [{"name": "recall_viewer_facts", "arguments": {"query": "{q}"}}]}},
    ]


def last_prompts(settings, count: int) -> list[str]:
    """What the scripted model was sent in its last `count` calls (messages as JSON text)."""
    url = f"http://127.0.0.1:{settings.scripted_model_port}/_script/requests?limit={count}"
    return [json.dumps(entry["messages"], ensure_ascii=False) for entry in _http_json("GET", url)["requests"]]


def said(response) -> str:
    return " ".join(_text(m.content) for m in response.messages if m.message_type == "assistant_message")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--streams", type=int, help="streams told to the large viewer (default 50)")
    p.add_argument("--facts-per-stream", type=int, help="facts told per stream (default 10)")
    p.add_argument("--small-streams", type=int, help="streams told to the small viewer (default 5: 50 facts)")
    p.add_argument("--ages", help="ages asked about, in streams before the last (default 1,10,50)")
    p.add_argument("--per-age", type=int, help="questions per age and viewer (default 10)")
    args = parse(p, FULL, QUICK)
    ages = [int(a) for a in args.ages.split(",")]
    with bench_stack(args.reuse_stack) as settings, scripted_rules(settings, rules()):
        rid = run_id()
        sizes = {"large": args.streams, "small": args.small_streams}
        viewers = {size: f"bench:recall-{size}-{rid}" for size in sizes}
        agents = ensure_agents(settings, list(viewers.values()))
        gate = GateClient.from_settings(settings)
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
        client = letta_client(settings, for_messages=True).with_options(timeout=300)
        real = settings.uses_real_model
        rows, plain_times, recall_times, prompt = [], [], [], {}
        for size, streams in sizes.items():
            agent = agents[viewers[size]]
            for age in ages:
                if age > streams:
                    continue
                stream = told[size][streams - age]
                asked = hits = 0
                for thing, _, answer in stream[: args.per_age]:
                    started = time.perf_counter()
                    client.agents.messages.create(agent, messages=[{"role": "user", "content": PLAIN_TEXT}])
                    plain_times.append(time.perf_counter() - started)
                    if not real:
                        prompt.setdefault(size, len(last_prompts(settings, 1)[-1]))
                    started = time.perf_counter()
                    response = client.agents.messages.create(
                        agent, messages=[{"role": "user", "content": QUESTION.format(thing=thing)}])
                    recall_times.append(time.perf_counter() - started)
                    asked += 1
                    hits += answer in (said(response) if real else " ".join(last_prompts(settings, 2)))
                rows.append([f"{size} ({streams * args.facts_per_stream} facts)", age, asked, hits,
                             f"{hits / asked * 100:.0f} %" if asked else "n/a"])
        scored = "her reply" if real else "the prompt (core block or tool result)"
        prompt_rows = [[f"{size} ({sizes[size] * args.facts_per_stream} facts)", prompt.get(size) or "n/a"]
                       for size in sizes]
        report("Long-term recall by the age of a fact", settings, args.reuse_stack,
               scripted="recall_viewer_facts with the question's words, then the tool's answer", sections=[
            table(["viewer", "told streams ago", "asked", "recalled", "rate"], rows),
            f"Recalled = the answer was in {scored}.",
            table(["viewer", "prompt of a plain turn (characters)"], prompt_rows),
            table(["turn", "n", "p50 ms", "p95 ms", "× plain p50"], [
                ["plain", len(plain_times), ms(p50(plain_times)), ms(p95(plain_times)), "1.00"],
                ["recall (searches the tier)", len(recall_times), ms(p50(recall_times)), ms(p95(recall_times)),
                 ratio(p50(recall_times), p50(plain_times))],
            ]),
        ])


if __name__ == "__main__":
    main()
