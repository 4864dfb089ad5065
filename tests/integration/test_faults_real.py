"""Faults injected on the real stack (issue 14), each with the default LETTA_TIMEOUT (30 s).

Every test counts outcomes where they happen: the reply to each task's text on `tts_requests`
(once), the task's user message (its otid) in the agent's history (once), the model calls at the
scripted model, dead letters and what went to memory-python. Nothing lost, nothing answered twice,
each viewer's order kept. The rows of docs/RELIABILITY.md "Every turn runs once" name these tests.
"""

from __future__ import annotations

import time

import pytest

from provisioning.viewers import ViewerAgents
from tests.integration.bridge_helpers import (
    agents_of,
    bridge_leftovers,
    dead_letters,
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

pytestmark = pytest.mark.integration

# Waiting for Letta (fallback off) with short pauses, so a recovery is seen within a second.
WAITING = dict(LETTA_FALLBACK_TO_MEMORY=False, VTL_BRIDGE_RETRY_MAX_DELAY=1)
IDLE = {"requests": 0, "staging": 0, "triage": 0, "viewer_queues": 0}


@pytest.fixture(autouse=True)
def clean_state(clean_bridge):
    """Empty host lists and bridge keys, the scripted model's defaults."""


def slow_rule(marker: str, delay_ms: int) -> dict:
    return {"name": "slow", "when": {"user_contains": marker},
            "then": {"reply": "(slow) I heard: {user}", "delay_ms": delay_ms}}


def at_the_model(scripted, text: str) -> int:
    """How many model calls had `text` as their newest user message."""
    return sum(text in last_user_text(entry) for entry in scripted.requests())


def assert_answered_once_in_order(r, client, sent: list[dict], reply_for, bridge) -> list[dict]:
    """Every task of `sent` answered exactly once with its own reply, each viewer's in send order,
    each user message once in its agent's history; no dead letter, nothing left queued."""
    wait_for_replies(r, [t["task_id"] for t in sent], 150, bridge)
    time.sleep(1.0)  # a duplicate would show up now
    replies = tts_replies(r)
    assert sorted(x["task_id"] for x in replies) == sorted(t["task_id"] for t in sent), "answered twice or not at all"
    by_id = {t["task_id"]: t for t in sent}
    for reply in replies:
        assert reply["text"] == reply_for(by_id[reply["task_id"]]["content"]), reply
    assert not dead_letters(r), dead_letters(r)
    assert bridge_leftovers(r) == IDLE
    for viewer in dict.fromkeys(t["user_id"] for t in sent):
        mine = [t["task_id"] for t in sent if t["user_id"] == viewer]
        assert [x["task_id"] for x in replies if x["task_id"] in mine] == mine, f"{viewer} out of order"
        [agent] = agents_of(client, viewer)
        counts = user_otid_counts(client, agent.id)
        assert {i: otid_count(counts, i) for i in mine} == {i: 1 for i in mine}, history_digest(client, agent.id)
    return replies


def slow_reply(text: str) -> str:
    return f"(slow) I heard: {text}"


# --------------------------------------------------------------------------- Letta SIGKILLed mid-turn

def test_letta_sigkilled_mid_turn_resends_only_the_killed_message_and_a_killed_tool_turn_ends_with_words(
        stack, provisioned, scripted, r, bridges, client):
    """The server dies with two turns in flight (one kill, one orphan wait for both):

    - viewer A's turn while the model works on it: its run stays `running` forever in the database.
      The user message is stored only at the end of the first step, so the killed turn left
      nothing: once the orphan is old enough (max(60 s, 2 x LETTA_TIMEOUT)) the bridge sends that
      message again. The model sees it twice (the first answer died with the server), A's next
      message once;
    - viewer T's turn after the model called remember_viewer_fact, while it writes the words that
      follow: the tool step (and the user message) are stored, the run is orphaned; the bridge must
      ask for the words, not replay the turn as silence, nor send the message again;
    - viewer B, who writes after the restart, is answered at once: an orphan holds only its viewer.
    Each task is answered once, in order, its otid once in the history."""
    rid = run_id()
    viewer, tooled, other = f"it:lk-{rid}", f"it:tool-{rid}", f"it:lk2-{rid}"
    for v in (viewer, tooled, other):
        ViewerAgents(provisioned).ensure(v)
    marker, tool_marker = f"lk-{rid}", f"tool-{rid}"
    scripted.add_rules(slow_rule(marker, 8000))
    scripted.reply_with_tools("remember", None, ("remember_viewer_fact", {"fact": f"likes {rid} tea"}),
                              when={"user_contains": tool_marker}, times=1)
    scripted.add_rules({"name": "words", "times": 1, "when": {"after_tool": "remember_viewer_fact"},
                        "then": {"reply": "(words) noted, tea it is", "delay_ms": 4000}},
                       {"name": "words-again", "when": {"after_tool": "*"}, "then": {"reply": "(words) noted, tea it is"}})
    tool_task = task(tooled, f"{tool_marker} I like tea")
    sent = [task(viewer, f"{marker} a-one"), tool_task, task(viewer, f"{marker} a-two")]
    late = task(other, f"{marker} b-one")
    bridge = bridges(**WAITING)
    try:
        push(r, sent)
        wait_for(lambda: at_the_model(scripted, sent[0]["content"]) and scripted.used("words"), 30, 0.05,
                 what="A's first turn and T's words after its tool step at the model")
        assert stack.letta.kill()
        stack.letta.start(lambda _msg: None)
        push(r, [late])
        wait_for_replies(r, [late["task_id"]], 30, bridge)  # long before A's orphan is old enough
        replies = assert_answered_once_in_order(
            r, client, sent + [late], lambda text: "(words) noted, tea it is" if tool_marker in text else slow_reply(text),
            bridge)
    finally:
        if not stack.letta.healthy():
            stack.letta.start(lambda _msg: None)
    assert [at_the_model(scripted, t["content"]) for t in (sent[0], sent[2], late)] == [2, 1, 1]
    assert not next(x for x in replies if x["task_id"] == tool_task["task_id"]).get("silent"), replies
    assert scripted.used("remember") == 1, "the message was sent again after its tool step"
    assert scripted.used("words-again") == 1


# --------------------------------------------------------------------------- Redis restarted

def test_redis_restarted_with_tasks_queued_and_in_flight_loses_and_doubles_nothing(
        stack, provisioned, scripted, r, bridges, client):
    """Redis stops gracefully (SIGTERM: it writes its append-only file) while one viewer's turn is
    at the model and more tasks wait for them and for a second viewer, and comes back 3 s later.
    The bridge reconnects; the turn whose FINISH could not be written is found in the agent's
    history and replayed, never sent again, as soon as Redis is back."""
    rid = run_id()
    viewer, other = f"it:rr-{rid}", f"it:rr2-{rid}"
    for v in (viewer, other):
        ViewerAgents(provisioned).ensure(v)
    marker = f"rr-{rid}"
    scripted.add_rules(slow_rule(marker, 2000))
    sent = [task(viewer, f"{marker} a-one"), task(viewer, f"{marker} a-two"), task(other, f"{marker} b-one"),
            task(viewer, f"{marker} a-three"), task(other, f"{marker} b-two")]
    bridge = bridges(**WAITING, VTL_BRIDGE_CONCURRENCY=1)
    push(r, sent)
    wait_for(lambda: at_the_model(scripted, sent[0]["content"]), 30, 0.05, what="the first turn at the model")
    try:
        assert stack.redis.stop()
        time.sleep(3)
    finally:
        stack.redis.start(lambda _msg: None)
    back = time.monotonic()
    wait_for_replies(r, [t["task_id"] for t in sent], provisioned.bridge_lock_ttl, bridge)
    # The viewer whose FINISH was lost was handed back as soon as Redis answered, not after its
    # lock (restored from the append-only file) expired.
    assert time.monotonic() - back < provisioned.bridge_lock_ttl
    assert_answered_once_in_order(r, client, sent, slow_reply, bridge)
    assert [at_the_model(scripted, t["content"]) for t in sent] == [1] * len(sent)
    assert bridge.alive and bridge.check(), bridge.log_tail()


# --------------------------------------------------------------------------- Postgres stopped

def test_postgres_stopped_for_20_s_is_waited_out_and_every_task_answered_once(
        stack, provisioned, scripted, r, bridges, client):
    """Letta's database goes away for 20 s with one turn in flight and more queued: Letta cannot
    answer now (fallback off: the tasks wait), then it serves again without a restart."""
    rid = run_id()
    viewer, other = f"it:pg-{rid}", f"it:pg2-{rid}"
    for v in (viewer, other):
        ViewerAgents(provisioned).ensure(v)
    marker = f"pg-{rid}"
    scripted.add_rules(slow_rule(marker, 3000))
    sent = [task(viewer, f"{marker} a-one"), task(other, f"{marker} b-one"), task(viewer, f"{marker} a-two")]
    bridge = bridges(**WAITING, VTL_BRIDGE_CONCURRENCY=1)
    push(r, sent)
    wait_for(lambda: at_the_model(scripted, sent[0]["content"]), 30, 0.05, what="the first turn at the model")
    letta_pid = stack.letta.process.pid()
    try:
        assert stack.postgres.stop()
        time.sleep(20)
        assert not dead_letters(r), dead_letters(r)
    finally:
        stack.postgres.start(lambda _msg: None)
    assert_answered_once_in_order(r, client, sent, slow_reply, bridge)
    assert stack.letta.process.pid() == letta_pid and stack.letta.healthy()  # recovered without a restart
    # The turn in flight: the model answered after the database was gone, so nothing of it was
    # stored (its run stays `running`: an orphan, waited out) and its message was put again.
    assert [at_the_model(scripted, t["content"]) for t in sent] == [2, 1, 1]


# --------------------------------------------------------------------------- a cut stream, an interrupted tool step

def test_a_stream_cut_on_the_real_stack_ends_with_the_real_answer(provisioned, scripted, r, bridges, client):
    rid = run_id()
    viewer = f"it:cut-{rid}"
    ViewerAgents(provisioned).ensure(viewer)
    marker = f"cut-{rid}"
    scripted.add_rules({"name": "whole", "when": {"user_contains": marker}, "then": {"reply": "(whole) I heard: {user}"}})
    scripted.cut_stream("cut", 3, {"reply": "(cut) this is never finished, no"}, when={"user_contains": marker})
    sent = [task(viewer, f"{marker} one"), task(viewer, f"{marker} two")]
    bridge = bridges(**WAITING, VTL_BRIDGE_STREAMING=True)
    push(r, sent)
    replies = assert_answered_once_in_order(r, client, sent, lambda text: f"(whole) I heard: {text}", bridge)
    assert not any(x.get("silent") for x in replies)
    assert scripted.used("cut") == 1 and scripted.used("whole") == 2  # the cut answer, once more, then the next


# --------------------------------------------------------------------------- the model endpoint down for 60 s

DOWN_MS = 60_000


def test_the_model_endpoint_down_for_60_s_is_waited_out_with_fallback_off(provisioned, scripted, r, bridges, client):
    rid = run_id()
    viewer = f"it:out-{rid}"
    ViewerAgents(provisioned).ensure(viewer)
    marker = f"out-{rid}"
    scripted.add_rules({"name": "up", "when": {"user_contains": marker}, "then": {"reply": "(back) I heard: {user}"}})
    scripted.fail("down", 500, when={"user_contains": marker}, times=None, for_ms=DOWN_MS)
    started = time.monotonic()
    sent = [task(viewer, f"{marker} one"), task(viewer, f"{marker} two")]
    bridge = bridges(**WAITING)
    push(r, sent)
    assert_answered_once_in_order(r, client, sent, lambda text: f"(back) I heard: {text}", bridge)
    assert time.monotonic() - started >= DOWN_MS / 1000
    assert scripted.used("down") > 3 and scripted.used("up") == 2  # waited through many failures, then once each
    assert not memory_queue(r)


def test_the_model_endpoint_down_with_fallback_on_forwards_each_task_once(provisioned, scripted, r, bridges, client):
    rid = run_id()
    viewer = f"it:fb-{rid}"
    ViewerAgents(provisioned).ensure(viewer)
    marker = f"fb-{rid}"
    scripted.fail("down", 500, when={"user_contains": marker}, times=None, for_ms=DOWN_MS)
    sent = [task(viewer, f"{marker} one"), task(viewer, f"{marker} two")]
    bridge = bridges(LETTA_FALLBACK_TO_MEMORY=True, VTL_BRIDGE_RETRY_MAX_DELAY=1)
    push(r, sent)
    wait_for(lambda: len(memory_queue(r)) >= len(sent), 90, what="both tasks on user_input_queue")
    wait_for(lambda: bridge_leftovers(r) == IDLE, 30, what="the bridge idle")
    time.sleep(1.0)
    forwarded = memory_queue(r)
    assert [x["task_id"] for x in forwarded] == [t["task_id"] for t in sent]  # once each, in order
    assert all(x["meta"].get("letta_fallback") is True for x in forwarded)
    assert not tts_replies(r) and not dead_letters(r)
    [agent] = agents_of(client, viewer)
    counts = user_otid_counts(client, agent.id)
    assert [otid_count(counts, t["task_id"]) for t in sent] == [0, 0], history_digest(client, agent.id)
    assert bridge.alive, bridge.log_tail()
