"""The bridge against the real stack: a `vtuber-letta bridge` subprocess, real Redis, Letta 0.16.8
and the scripted model. Restarts, a burst of viewers, a SIGKILL mid-turn, hostile payloads and a
Letta outage; every test counts replies on `tts_requests` (a list: no pub/sub race) and, where it
matters, how often each task's user message (its otid) is in the agent's history."""

from __future__ import annotations

import json
import time

import pytest

from bridge.letta_turns import otid_for
from provisioning.viewers import ViewerAgents
from tests.integration.bridge_helpers import (
    CRASH_KNOBS,
    ChannelRecorder,
    agents_of,
    bridge_leftovers,
    dead_letters,
    encode,
    history_digest,
    last_user_text,
    memory_queue,
    otid_count,
    push,
    run_id,
    task,
    tts_replies,
    user_otid_counts,
    wait_for,
    wait_for_replies,
)
from tests.integration.scripted import request_text
from vtuber_letta import redis_keys as keys
from vtuber_letta.commands.demo import DEMO_RULES

pytestmark = pytest.mark.integration

DEFAULT_REPLY = "(scripted) I heard: {}"
# --------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def clean_state(clean_bridge):
    """Every test starts with empty host lists and bridge keys, and the scripted model's defaults."""


def by_task(replies: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for reply in replies:
        out.setdefault(reply["task_id"], []).append(reply)
    return out


# --------------------------------------------------------------------------- 1. memory survives restarts

def test_memory_survives_bridge_and_letta_restart_and_stays_per_viewer(stack, provisioned, scripted, r, bridges, client):
    rid = run_id()
    alice, bob = f"it:alice-{rid}", f"it:bob-{rid}"
    name = f"Veyra{rid}"
    scripted.add_rules(*DEMO_RULES)

    bridge = bridges()
    told = push(r, [task(alice, f"Hi Luna! My name is {name} and I love cats.", display_name="Alice")])
    told_id = json.loads(told[0])["task_id"]
    reply = by_task(wait_for_replies(r, [told_id], 90, bridge))[told_id]
    assert reply[0]["text"] == f"Nice to meet you, {name}! I'll remember that. 星星在看着你哦～"
    assert scripted.used("demo-remember-name") == 1  # the fact went through the real tool call
    # Her words came before the calls in that response: they went to speech while the tools ran.
    assert r.exists(keys.task_spoken(told_id)) == 1 and len(reply) == 1

    # Stop the bridge gracefully (exit 0, heartbeat gone), restart Letta, start a new bridge.
    assert bridge.stop() == 0, bridge.log_tail()
    assert not bridge.check(), "a stopped bridge still heartbeats"
    stack.restart_letta()
    bridge = bridges()

    recall = task(alice, "Do you remember my name?", display_name="Alice")
    stranger = task(bob, "Do you remember my name?", display_name="Bob")
    push(r, [recall, stranger])
    replies = by_task(wait_for_replies(r, [recall["task_id"], stranger["task_id"]], 120, bridge))
    alice_reply = replies[recall["task_id"]][0]["text"]  # the line of her human block, as the model read it
    assert alice_reply.startswith("Of course I remember! In my notes about you:"), alice_reply
    assert alice_reply.endswith(f"their name is {name}"), alice_reply
    bob_reply = replies[stranger["task_id"]][0]["text"]
    assert bob_reply == "Hmm, I don't think you've told me your name yet. What should I call you?"

    # Nothing of Alice's reached Bob's agent: check every prompt the model got for Bob.
    bob_requests = [entry for entry in scripted.requests() if bob in request_text(entry)]
    assert bob_requests, "no request of Bob's agent was logged"
    for entry in bob_requests:
        assert name not in request_text(entry), f"Alice's name leaked into Bob's prompt: {entry['seq']}"
    # ... and Alice's memory is in her agent only.
    [alice_agent] = agents_of(client, alice)
    [bob_agent] = agents_of(client, bob)
    assert name in client.agents.blocks.retrieve("human", agent_id=alice_agent.id).value
    assert name not in client.agents.blocks.retrieve("human", agent_id=bob_agent.id).value


# --------------------------------------------------------------------------- 2. a burst of viewers

def test_burst_of_five_viewers_each_answered_once_in_order(provisioned, r, bridges, client):
    rid = run_id()
    viewers = [f"it:burst{v}-{rid}" for v in range(5)]
    tasks = {v: [task(viewer, f"{rid} v{v}-m{m:02d}", task_id=f"b-{rid}-v{v}-m{m:02d}", display_name=f"Burst{v}")
                 for m in range(20)] for v, viewer in enumerate(viewers)}
    interleaved = [tasks[v][m] for m in range(20) for v in range(5)]
    all_ids = [t["task_id"] for t in interleaved]
    assert len(set(all_ids)) == 100

    recorder = ChannelRecorder(r, keys.LETTA_RESPONSES)
    try:
        bridge = bridges()
        push(r, interleaved)  # one LPUSH of all 100
        replies = wait_for_replies(r, all_ids, 180, bridge)
        wait_for(lambda: len({m["task_id"] for m in recorder.on(keys.LETTA_RESPONSES)}) >= 100, 10,
                 what="100 letta_responses")
        time.sleep(1.0)  # a duplicate would show up now
        replies = tts_replies(r)
        responses = recorder.on(keys.LETTA_RESPONSES)
    finally:
        recorder.close()

    # Exactly once, on both outputs.
    assert len(replies) == 100 and sorted(x["task_id"] for x in replies) == sorted(all_ids)
    assert len(responses) == 100 and sorted(x["task_id"] for x in responses) == sorted(all_ids)
    assert not dead_letters(r)
    assert bridge_leftovers(r) == {"requests": 0, "staging": 0, "triage": 0, "viewer_queues": 0}
    sent = {t["task_id"]: t for t in interleaved}
    for response in responses:
        assert response["user_id"] == sent[response["task_id"]]["user_id"]
        assert response["source"] == "letta" and response["silent"] is False
    # Each viewer's replies in the order sent, each echoing its own message.
    for v in range(len(viewers)):
        mine = [x for x in replies if x["task_id"].startswith(f"b-{rid}-v{v}-")]
        assert [x["task_id"] for x in mine] == [t["task_id"] for t in tasks[v]], f"viewer {v} out of order"
        for reply, sent_task in zip(mine, tasks[v]):
            assert reply["text"] == DEFAULT_REPLY.format(sent_task["content"])
            assert reply["response_channel"] == f"task_response:{sent_task['task_id']}"
    # One agent per viewer on the server, and each task reached its history exactly once.
    for v, viewer in enumerate(viewers):
        agents = agents_of(client, viewer)
        assert len(agents) == 1, f"viewer {viewer} has {len(agents)} agents"
        counts = user_otid_counts(client, agents[0].id)
        assert {t["task_id"]: otid_count(counts, t["task_id"]) for t in tasks[v]} == {t["task_id"]: 1 for t in tasks[v]}
        assert r.hget(keys.VIEWER_AGENTS, viewer).decode() == agents[0].id


# --------------------------------------------------------------------------- 3. SIGKILL mid-turn

def test_sigkill_mid_turn_loses_nothing_and_never_sends_a_turn_twice(provisioned, scripted, r, bridges, client):
    rid = run_id()
    viewers = [f"it:crash{v}-{rid}" for v in range(2)]
    for viewer in viewers:  # agents first: the turns, not agent creation, are what gets killed
        ViewerAgents(provisioned).ensure(viewer)
    marker = f"slow-{rid}"
    scripted.add_rules({"name": "slow", "when": {"user_contains": marker},
                        "then": {"reply": "(slow) I heard: {user}", "delay_ms": 2000}})
    tasks = [task(viewers[m % 2], f"{marker} c{m % 2}-m{m // 2}", task_id=f"c-{rid}-{m}") for m in range(6)]
    ids = [t["task_id"] for t in tasks]
    knobs = CRASH_KNOBS

    first = bridges(**knobs)
    push(r, tasks)
    # Kill as soon as the model is working on one of these turns (it sleeps 2 s in it).
    wait_for(lambda: any(marker in last_user_text(e) for e in scripted.requests()), 30, 0.05,
             what="the first slow turn to reach the model")
    first.kill()
    answered_before_kill = {x["task_id"] for x in tts_replies(r)}
    in_flight = {t["task_id"] for t in tasks if any(t["content"] in last_user_text(e) for e in scripted.requests())}
    assert in_flight and not answered_before_kill, (in_flight, answered_before_kill)
    assert not first.alive

    second = bridges(**knobs)
    replies = wait_for_replies(r, ids, 120, second)
    time.sleep(1.0)
    replies = tts_replies(r)
    assert sorted(x["task_id"] for x in replies) == sorted(ids), "a task was answered twice or not at all"
    for reply in replies:
        sent = next(t for t in tasks if t["task_id"] == reply["task_id"])
        assert reply["text"] == f"(slow) I heard: {sent['content']}"
    for v, viewer in enumerate(viewers):
        mine = [x["task_id"] for x in replies if x["task_id"] in {t["task_id"] for t in tasks[v::2]}]
        assert mine == [t["task_id"] for t in tasks[v::2]], f"viewer {v} out of order"
        [agent] = agents_of(client, viewer)
        counts = user_otid_counts(client, agent.id)
        assert {t["task_id"]: otid_count(counts, t["task_id"]) for t in tasks[v::2]} == {
            t["task_id"]: 1 for t in tasks[v::2]}, (
            f"a task's user message reached Letta twice; otids {[otid_for(t['task_id']) for t in tasks[v::2]]}\n"
            f"{history_digest(client, agent.id)}\nlog of the second bridge:\n{second.log_text()}")
    # Each task was put to the model once: the killed turn finished on the server and was replayed.
    model_saw = [last_user_text(e) for e in scripted.requests()]
    assert {t["content"]: sum(t["content"] == text for text in model_saw) for t in tasks} == {t["content"]: 1 for t in tasks}
    assert "outcome=replayed" in second.log_text(), second.log_tail()
    assert not dead_letters(r)
    assert bridge_leftovers(r) == {"requests": 0, "staging": 0, "triage": 0, "viewer_queues": 0}


# --------------------------------------------------------------------------- 3b. a turn that outlives the deadline

@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "plain"])
def test_a_turn_that_outlives_the_deadline_once_is_answered_once_and_run_once(
        provisioned, scripted, r, bridges, client, streaming):
    """The model takes longer than LETTA_TIMEOUT (the default knobs otherwise): the bridge gives up
    on the call, but Letta's run goes on. The retry must wait for that run and replay it, not
    send the message again while it runs (that was two model turns for one message)."""
    rid = run_id()
    viewer = f"it:late-{rid}"
    ViewerAgents(provisioned).ensure(viewer)
    marker = f"late-{rid}"
    scripted.add_rules({"name": "late", "when": {"user_contains": marker},
                        "then": {"reply": "(late) I heard: {user}", "delay_ms": 6500}})
    slow, after = task(viewer, f"{marker} one"), task(viewer, f"{marker} two")
    bridge = bridges(LETTA_TIMEOUT=3, VTL_BRIDGE_STREAMING=streaming)
    push(r, [slow, after])
    replies = wait_for_replies(r, [slow["task_id"], after["task_id"]], 120, bridge)
    time.sleep(1.0)
    assert [x["task_id"] for x in tts_replies(r)] == [slow["task_id"], after["task_id"]], "answered twice, or out of order"
    assert replies[0]["text"] == f"(late) I heard: {marker} one"
    assert scripted.used("late") == 2, "a message was put to the model more than once"  # counted at the model
    [agent] = agents_of(client, viewer)
    counts = user_otid_counts(client, agent.id)
    assert otid_count(counts, slow["task_id"]) == 1 and otid_count(counts, after["task_id"]) == 1, \
        history_digest(client, agent.id)
    assert bridge.log_text().count("outcome=replayed") == 2, bridge.log_tail()
    assert not dead_letters(r)


# --------------------------------------------------------------------------- 3c. stale chat

def test_chat_that_waited_past_the_limit_is_not_answered_late_but_a_gift_is(provisioned, scripted, r, bridges, client):
    """A slow turn holds the viewer longer than VTL_BRIDGE_STALE_CHAT_AFTER (2 s): the chat queued
    behind it ends `stale` without reaching the model; the gift queued with it is answered (its
    support recorded), and a chat sent afterwards is answered."""
    rid = run_id()
    viewer, marker = f"it:stale-{rid}", f"slowhead-{rid}"
    ViewerAgents(provisioned).ensure(viewer)
    scripted.add_rules({"name": "slow", "when": {"user_contains": marker}, "then": {"reply": "(slow) ok", "delay_ms": 5000}})
    head = task(viewer, f"{marker} first")
    stale = [task(viewer, f"old-{rid}-{i}") for i in range(3)]
    gift = task(viewer, "", task_type="gift", meta={"gift_name": "rose", "count": 1})
    fresh = task(viewer, f"new-{rid}")
    recorder = ChannelRecorder(r, keys.LETTA_RESPONSES)
    try:
        bridge = bridges(VTL_BRIDGE_STALE_CHAT_AFTER=2)
        push(r, [head])
        wait_for(lambda: any(marker in last_user_text(e) for e in scripted.requests()), 60, 0.05,
                 what="the slow turn to reach the model")
        push(r, [stale[0], stale[1], gift, stale[2]])  # routed at once, then they wait behind the slow turn
        wait_for_replies(r, [head["task_id"], gift["task_id"]], 120, bridge)
        push(r, [fresh])
        wait_for_replies(r, [fresh["task_id"]], 60, bridge)
        wait_for(lambda: all(r.exists(keys.task_done(t["task_id"])) for t in stale), 30, what="the stale chats ended")
        time.sleep(0.5)
    finally:
        recorder.close()
    assert [x["task_id"] for x in tts_replies(r)] == [head["task_id"], gift["task_id"], fresh["task_id"]]
    model_saw = [last_user_text(e) for e in scripted.requests()]
    assert {t["content"]: sum(t["content"] in text for text in model_saw) for t in stale} == {t["content"]: 0 for t in stale}
    assert sum(fresh["content"] in text for text in model_saw) == 1 and scripted.used("slow") == 1
    assert [r.get(keys.task_done(t["task_id"])) for t in stale] == [b"stale"] * 3
    records = {m["task_id"]: m for m in recorder.on(keys.LETTA_RESPONSES)}
    assert [(records[t["task_id"]].get("stale"), records[t["task_id"]]["response_text"]) for t in stale] == [(True, "")] * 3
    assert bridge.log_text().count("outcome=stale") == 3, bridge.log_tail()
    [agent] = agents_of(client, viewer)
    counts = user_otid_counts(client, agent.id)
    assert [otid_count(counts, t["task_id"]) for t in stale] == [0, 0, 0], history_digest(client, agent.id)
    assert not dead_letters(r)


FAILURES = 24


@pytest.mark.parametrize("status", [500, 429, 401])
def test_a_failing_model_endpoint_is_waited_out_not_dead_lettered(provisioned, scripted, r, bridges, client, status):
    """The model behind Letta answers 500 (down), 429 (rate limit) or 401 (key refused) for a while,
    fallback off: Letta cannot answer now, so the tasks wait — more failures than
    LETTA_RETRY_ATTEMPTS, yet no dead letter — and are answered once each, in order, afterwards."""
    rid = run_id()
    viewer = f"it:down{status}-{rid}"
    ViewerAgents(provisioned).ensure(viewer)
    marker = f"down-{rid}"
    scripted.add_rules({"name": "up", "when": {"user_contains": marker}, "then": {"reply": "(back) I heard: {user}"}})
    # 24 failures: Letta's OpenAI client tries each model call 3 times (500/429), so that is 8
    # attempts of the bridge for 500/429 and 24 for 401, all beyond LETTA_RETRY_ATTEMPTS (3).
    scripted.fail("down", status, when={"user_contains": marker}, times=FAILURES)
    tasks = [task(viewer, f"{marker} one"), task(viewer, f"{marker} two")]
    bridge = bridges(VTL_BRIDGE_RETRY_MAX_DELAY=1, LETTA_FALLBACK_TO_MEMORY=False)
    push(r, tasks)
    wait_for_replies(r, [t["task_id"] for t in tasks], 120, bridge)
    time.sleep(1.0)
    assert [x["task_id"] for x in tts_replies(r)] == [t["task_id"] for t in tasks]
    assert scripted.used("down") == FAILURES and scripted.used("up") == 2  # every failure seen, then one turn each
    assert not dead_letters(r), dead_letters(r)
    [agent] = agents_of(client, viewer)
    counts = user_otid_counts(client, agent.id)
    assert [otid_count(counts, t["task_id"]) for t in tasks] == [1, 1], history_digest(client, agent.id)


# --------------------------------------------------------------------------- 4. hostile payloads

def test_bad_payloads_are_dead_lettered_with_reason_and_raw_and_good_ones_answered(provisioned, r, bridges):
    rid = run_id()
    good = f"it:good-{rid}"
    goods = [task(good, f"{rid} good-{i}", task_id=f"g-{rid}-{i}") for i in range(7)]

    def bad(n: int, **fields) -> dict:
        body = task(good, f"{rid} bad-{n}", task_id=f"x-{rid}-{n}")
        for key, value in fields.items():
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        return body

    valid_text = json.dumps(task(good, "cut short", task_id=f"x-{rid}-trunc"))
    bads: dict[str, bytes | str | dict | list] = {
        "invalid json": f"{{not json {rid}",
        "truncated json": valid_text[: len(valid_text) // 2],
        "json array": [{"task_id": f"x-{rid}-arr", "user_id": good, "type": "text", "content": "in an array"}],
        "json string": json.dumps(f"just a string {rid}"),
        "missing user_id": bad(1, user_id=None),
        "missing content and input_file": bad(2, content=None),
        "blank content": bad(3, content="   \n\t "),
        "content over the limit": bad(4, content="x" * 4001),
        "payload over the limit": bad(5, content="y" * 70_000),
        "user_id of 10,000 chars": bad(6, user_id="u" * 10_000),
        "user_id with control chars": bad(7, user_id="evil\x00\n\x1b[31m"),
        "user_id with a bidi override": bad(8, user_id=f"it:\u202egood-{rid}"),
        "user_id not a string": bad(9, user_id=12345),
        "unknown type": bad(10, type="bogus"),
        "input_file outside uploads": bad(11, content=None, input_file="/etc/passwd"),
        "input_file traversal": bad(12, content=None, input_file="../../../../etc/passwd"),
        "NaN": f'{{"task_id": "x-{rid}-nan", "type": "text", "user_id": "{good}", "content": "n", "meta": {{"amount": NaN}}}}',
        "deeply nested": "[" * 20_000 + "]" * 20_000,
        "super_chat without amount": bad(13, type="super_chat"),
        "hostile task_id": bad(14, task_id="../../etc/passwd"),
        "bytes that are not UTF-8": b"\xff\xfe{\"task_id\": \"x-" + rid.encode() + b"-bin\"}\x80",
    }
    labels = list(bads)
    payloads: list = []
    for i, label in enumerate(labels):  # good, bad, good, bad, ... then the remaining bad ones
        if i < len(goods):
            payloads.append(goods[i])
        payloads.append(bads[label])
    # A temporary task among them is not for Letta: forwarded to memory-python byte for byte.
    temporary = task(good, f"{rid} just passing by", task_id=f"tmp-{rid}", meta={"memory_type": "temporary"})
    payloads.insert(len(payloads) // 2, temporary)
    bridge = bridges()
    raws = push(r, payloads)

    replies = wait_for_replies(r, [g["task_id"] for g in goods], 120, bridge)
    assert [x["task_id"] for x in replies] == [g["task_id"] for g in goods]
    assert [x["text"] for x in replies] == [DEFAULT_REPLY.format(g["content"]) for g in goods]

    wait_for(lambda: len(dead_letters(r)) >= len(bads), 30, what=f"{len(bads)} dead letters")
    time.sleep(0.5)
    letters = dead_letters(r)
    assert len(letters) == len(bads), [d["reason"] for d in letters]
    limit = provisioned.bridge_max_payload_bytes
    reasons = {}
    for label in labels:
        raw = encode(bads[label])
        expected = raw[:limit].decode("utf-8", "replace") + ("…[truncated]" if len(raw) > limit else "")
        matching = [d for d in letters if d["raw"] == expected]
        assert len(matching) == 1, f"{label}: {len(matching)} dead letters hold its raw payload"
        letter = matching[0]
        assert letter["reason"].strip(), label
        assert letter["stage"] in ("intake", "validate"), (label, letter)
        assert letter["replica_id"] == bridge.replica_id
        reasons[label] = letter["reason"]
    assert "outside the uploads folder" in reasons["input_file outside uploads"]
    assert "limit is 65536" in reasons["payload over the limit"]
    assert "content" in reasons["content over the limit"]
    assert r.lrange(keys.USER_INPUT_QUEUE, 0, -1) == [raws[payloads.index(temporary)]]
    assert bridge.alive and bridge.check(), bridge.log_tail()
    assert bridge_leftovers(r) == {"requests": 0, "staging": 0, "triage": 0, "viewer_queues": 0}


# --------------------------------------------------------------------------- 5. Letta down

def test_letta_down_falls_back_or_waits_and_loses_nothing(stack, provisioned, r, bridges, client):
    rid = run_id()
    known, new = f"it:known-{rid}", f"it:new-{rid}"
    ViewerAgents(provisioned).ensure(known)
    fast_retry = dict(LETTA_RETRY_ATTEMPTS=1, VTL_BRIDGE_RETRY_BASE_DELAY=0.1, VTL_BRIDGE_RETRY_MAX_DELAY=1,
                      LETTA_TIMEOUT=5)
    try:
        stack.letta.stop()
        assert not stack.letta.healthy()

        # (a) fallback on: every task reaches memory-python, marked, otherwise as sent.
        falling = bridges(LETTA_FALLBACK_TO_MEMORY=True, **fast_retry)
        sent_a = [task(known if i % 3 else new, f"{rid} fallback-{i}", task_id=f"fa-{rid}-{i}") for i in range(6)]
        push(r, sent_a)
        wait_for(lambda: len(memory_queue(r)) >= len(sent_a), 60, what="6 fallback tasks on user_input_queue")
        time.sleep(0.5)
        forwarded = memory_queue(r)
        assert [x["task_id"] for x in forwarded if x["user_id"] == known] == [t["task_id"] for t in sent_a if t["user_id"] == known]
        assert [x["task_id"] for x in forwarded if x["user_id"] == new] == [t["task_id"] for t in sent_a if t["user_id"] == new]
        assert len(forwarded) == len(sent_a)
        for item in forwarded:
            original = next(t for t in sent_a if t["task_id"] == item["task_id"])
            assert item["meta"].pop("letta_fallback") is True
            assert item == original
        assert not tts_replies(r) and not dead_letters(r)
        assert falling.stop() == 0, falling.log_tail()
        r.delete(keys.USER_INPUT_QUEUE)

        # (b) fallback off: tasks wait for Letta, then are answered, in order, once.
        waiting = bridges(LETTA_FALLBACK_TO_MEMORY=False, **fast_retry)
        sent_b = [task(known if i % 3 else new, f"{rid} wait-{i}", task_id=f"wb-{rid}-{i}") for i in range(6)]
        push(r, sent_b)
        time.sleep(4)
        assert not tts_replies(r) and not memory_queue(r) and not dead_letters(r)
        assert bridge_leftovers(r)["viewer_queues"] == len(sent_b)
        assert waiting.alive and waiting.check()

        stack.letta.start(lambda _msg: None)
        replies = wait_for_replies(r, [t["task_id"] for t in sent_b], 120, waiting)
        time.sleep(1.0)
        replies = tts_replies(r)
        for viewer in (known, new):
            assert [x["task_id"] for x in replies if x["task_id"] in {t["task_id"] for t in sent_b if t["user_id"] == viewer}] == [
                t["task_id"] for t in sent_b if t["user_id"] == viewer]
        assert sorted(x["task_id"] for x in replies) == sorted(t["task_id"] for t in sent_b)
        for reply in replies:
            sent = next(t for t in sent_b if t["task_id"] == reply["task_id"])
            assert reply["text"] == DEFAULT_REPLY.format(sent["content"])
        assert not memory_queue(r) and not dead_letters(r)
        for viewer in (known, new):
            [agent] = agents_of(client, viewer)
            counts = user_otid_counts(client, agent.id)
            for t in sent_b:
                if t["user_id"] == viewer:
                    assert otid_count(counts, t["task_id"]) == 1, t["task_id"]
            for t in sent_a:
                if t["user_id"] == viewer:
                    assert otid_count(counts, t["task_id"]) == 0, f"fallback task {t['task_id']} also reached Letta"
    finally:
        if not stack.letta.healthy():
            stack.letta.start(lambda _msg: None)


# --------------------------------------------------------------------------- 6. bytes that are not UTF-8

def test_user_id_that_is_not_utf8_is_dead_lettered_and_crash_recovery_still_works(provisioned, scripted, r, bridges):
    """The route script (Lua cjson) accepts any bytes in a JSON string, so a user_id holding bytes
    that are not UTF-8 is routed to a viewer queue; the bridge must still dead-letter it, and it
    must not stop the sweeper that hands a crashed replica's viewers to a live one."""
    rid = run_id()
    viewer = f"it:after-{rid}"
    ViewerAgents(provisioned).ensure(viewer)
    marker = f"slow-{rid}"
    scripted.add_rules({"name": "slow", "when": {"user_contains": marker},
                        "then": {"reply": "(slow) I heard: {user}", "delay_ms": 2000}})
    hostile = (b'{"task_id": "h-' + rid.encode() + b'", "type": "text", "user_id": "it:\xff\xfe' + rid.encode()
               + b'", "content": "hello", "meta": {"memory_type": "permanent"}}')
    tasks = [task(viewer, f"{marker} after-{m}", task_id=f"a-{rid}-{m}") for m in range(2)]

    first = bridges(**CRASH_KNOBS)
    push(r, [hostile, *tasks])
    wait_for(lambda: any(marker in last_user_text(e) for e in scripted.requests()), 30, 0.05,
             what="the first slow turn to reach the model")
    first.kill()
    second = bridges(**CRASH_KNOBS)

    problems = []
    try:
        wait_for_replies(r, [t["task_id"] for t in tasks], 30, second)
    except AssertionError as exc:
        problems.append(f"the crashed replica's viewer was never taken over: {str(exc).splitlines()[0]}")
    expected_raw = hostile.decode("utf-8", "replace")
    if not any(d["raw"] == expected_raw for d in dead_letters(r)):
        problems.append(f"the payload with a non-UTF-8 user_id was not dead-lettered (pending: {r.smembers(keys.BRIDGE_PENDING)})")
    assert not problems, "\n".join(problems) + f"\nlog of the first bridge:\n{first.log_tail(30)}\nlog of the second bridge:\n{second.log_tail(30)}"
    assert second.alive and second.check()
