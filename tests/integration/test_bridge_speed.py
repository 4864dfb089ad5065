"""Streaming replies and burst coalescing against the real stack (a `vtuber-letta bridge`
subprocess with its defaults, Letta 0.16.8, the scripted model streaming token by token).

Speed itself is measured by bench/ (docs/BENCHMARKS.md), not asserted here: these tests check
what must hold whatever the timing — every sentence is published once and in order before the
final response, the final response carries the whole reply, a burst becomes few Letta turns, every
task gets a response, and no task's message reaches Letta twice, even across a SIGKILL."""

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
    clear_bridge_state,
    dead_letters,
    push,
    redis_conn,
    run_id,
    tts_replies,
    user_runs,
    wait_for,
)
from vtuber_letta import redis_keys as keys
from vtuber_letta.commands.say import build_task

pytestmark = pytest.mark.integration

TEN_SENTENCES = " ".join(f"Sentence number {n} is here." for n in range(1, 11))
# Whatever the developer's defaults: streaming and coalescing are on unless a test says otherwise.
DEFAULTS = dict(VTL_BRIDGE_COALESCE_MAX=8, VTL_BRIDGE_STREAMING=True)


@pytest.fixture
def r(stack, stack_settings, scripted):
    conn = redis_conn(stack_settings)
    clear_bridge_state(conn)
    scripted.reset()
    yield conn
    clear_bridge_state(conn)
    scripted.reset()
    conn.close()


@pytest.fixture
def bridge_defaults() -> dict:
    return DEFAULTS


def task(user_id: str, text: str, task_id: str) -> dict:
    body = build_task(user_id, text)
    body["task_id"] = task_id
    return body


def done_markers(r, task_ids: list[str]) -> dict[str, bytes | None]:
    """How each task ended (its vtl:done marker, the outcome word), None while unanswered."""
    return dict(zip(task_ids, r.mget([keys.task_done(t) for t in task_ids])))


def records(recorder: ChannelRecorder, task_ids: list[str]) -> dict[str, dict]:
    """Each task's record on letta_responses (its last one)."""
    return {m["task_id"]: m for m in recorder.on(keys.LETTA_RESPONSES) if m.get("task_id") in task_ids}


# --------------------------------------------------------------------------- streaming

def test_a_long_reply_is_published_sentence_by_sentence_and_spoken_per_sentence(provisioned, scripted, r, bridges):
    rid = run_id()
    viewer, other = f"it:stream-{rid}", f"it:smile-{rid}"
    scripted.add_rules(
        {"name": "smile", "when": {"user_contains": f"smile {rid}"},
         "then": {"call_tool": "set_expression", "arguments": {"expression": "happy"}}},
        {"name": "after-smile", "when": {"after_tool": "set_expression"}, "then": {"reply": "Done! I am smiling now."}},
        {"name": "long", "when": {"user_contains": f"talk {rid}"}, "then": {"reply": TEN_SENTENCES, "tokens_per_second": 200}},
    )
    recorder = ChannelRecorder(r, keys.LETTA_RESPONSES, "letta_response_chunks", keys.LIVE2D_EVENTS)
    try:
        bridge = bridges(VTL_BRIDGE_TTS_PER_SENTENCE=True)
        push(r, [task(viewer, f"talk {rid}", f"s-{rid}-1"), task(other, f"smile {rid}", f"s-{rid}-2")])
        wait_for(lambda: len(recorder.on(keys.LETTA_RESPONSES)) >= 2, 120, what=f"two responses\n{bridge.log_tail()}")
        time.sleep(0.5)
        messages = list(recorder.messages)
    finally:
        recorder.close()

    responses = {m["task_id"]: m for channel, m in messages if channel == keys.LETTA_RESPONSES}
    long_id, smile_id = f"s-{rid}-1", f"s-{rid}-2"
    assert responses[long_id]["response_text"] == TEN_SENTENCES  # the final message carries the whole reply
    chunks = [m for channel, m in messages if channel == "letta_response_chunks" and m["task_id"] == long_id]
    assert [c["text"] for c in chunks] == [f"Sentence number {n} is here." for n in range(1, 11)]
    assert [c["index"] for c in chunks] == list(range(10))
    # every chunk of the long reply was published before its final response
    final_at = next(i for i, (ch, m) in enumerate(messages) if ch == keys.LETTA_RESPONSES and m["task_id"] == long_id)
    assert all(i < final_at for i, (ch, m) in enumerate(messages) if ch == "letta_response_chunks" and m["task_id"] == long_id)
    speech = [t for t in tts_replies(r) if t["task_id"] == long_id]
    assert [(t["sentence_index"], t["text"]) for t in speech] == [(c["index"], c["text"]) for c in chunks]
    # A tool turn streams too: the avatar call is rebuilt from Letta's argument pieces.
    assert responses[smile_id]["response_text"] == "Done! I am smiling now."
    avatar = [m for channel, m in messages if channel == keys.LIVE2D_EVENTS]
    assert [(a["tool"], a["args"], a["task_id"]) for a in avatar] == [("set_expression", {"expression": "happy"}, smile_id)]
    assert not dead_letters(r)


# --------------------------------------------------------------------------- burst coalescing

def test_a_burst_of_ten_becomes_at_most_three_letta_turns_and_every_task_is_answered(provisioned, scripted, r, bridges, client):
    rid = run_id()
    viewer = f"it:burst-{rid}"
    ViewerAgents(provisioned).ensure(viewer)
    scripted.add_rules({"name": "slow-first", "when": {"user_contains": f"first {rid}"},
                        "then": {"reply": "Hello! One moment.", "delay_ms": 1500}})
    bridge = bridges()
    ids = [f"bu-{rid}-{i}" for i in range(10)]
    recorder = ChannelRecorder(r, keys.LETTA_RESPONSES)
    try:
        push(r, [task(viewer, f"first {rid}", ids[0])])
        wait_for(lambda: any(f"first {rid}" in json.dumps(e) for e in scripted.requests(limit=3)), 60, 0.05,
                 what="the first turn to reach the model")
        push(r, [task(viewer, f"message {i} {rid}", ids[i]) for i in range(1, 10)])  # nine more while it runs
        wait_for(lambda: all(done_markers(r, ids).values()), 120, what=f"ten answers\n{bridge.log_tail()}")
        wait_for(lambda: len(records(recorder, ids)) == 10, 10, what="ten records")
    finally:
        recorder.close()

    [agent] = agents_of(client, viewer)
    runs = user_runs(client, agent.id)
    assert {t: len(runs.get(otid_for(t), [])) for t in ids} == {t: 1 for t in ids}  # each message reached Letta once
    turns = {runs[otid_for(t)][0] for t in ids}
    assert len(turns) <= 3, f"{len(turns)} Letta turns for a burst of 10"
    done = records(recorder, ids)
    assert {t for t, word in done_markers(r, ids).items() if word == b"coalesced"} == {
        t for t in ids if done[t].get("answered_by")}  # the markers hold how each ended, not the reply
    answering = [t for t in ids if not done[t].get("answered_by")]
    assert len(answering) == len(turns)  # one reply per turn...
    for t in ids:  # ...and every other task names the reply that answered it
        if t not in answering:
            assert done[t]["answered_by"] in answering and done[t]["response_text"] == ""
            assert t in done[done[t]["answered_by"]]["answers"]
    assert sorted(x["task_id"] for x in tts_replies(r)) == sorted(answering)  # spoken once per turn
    assert not dead_letters(r)


def test_sigkill_during_a_coalesced_turn_replays_it_for_every_task(provisioned, scripted, r, bridges, client):
    rid = run_id()
    viewer = f"it:crashburst-{rid}"
    ViewerAgents(provisioned).ensure(viewer)
    marker = f"slow-{rid}"
    scripted.add_rules({"name": "slow", "when": {"user_contains": marker},
                        "then": {"reply": "(slow) I heard: {user}", "delay_ms": 2500}})
    ids = [f"cb-{rid}-{i}" for i in range(4)]
    recorder = ChannelRecorder(r, keys.LETTA_RESPONSES)
    try:
        push(r, [task(viewer, f"{marker} m{i}", ids[i]) for i in range(4)])  # queued before any bridge runs
        first = bridges(**CRASH_KNOBS)
        wait_for(lambda: any(marker in json.dumps(e) for e in scripted.requests(limit=3)), 60, 0.05,
                 what="the first turn to reach the model")
        first.kill()
        assert not any(done_markers(r, ids).values())

        second = bridges(**CRASH_KNOBS)
        wait_for(lambda: all(done_markers(r, ids).values()), 120, what=f"four answers\n{second.log_tail()}")
        wait_for(lambda: len(records(recorder, ids)) == 4, 10, what="four records")
    finally:
        recorder.close()
    [agent] = agents_of(client, viewer)
    runs = user_runs(client, agent.id)
    assert {t: len(runs.get(otid_for(t), [])) for t in ids} == {t: 1 for t in ids}, second.log_text()
    assert "outcome=replayed" in second.log_text()
    done = records(recorder, ids)
    for t in ids:
        answered_by = done[t].get("answered_by")
        if answered_by:  # answered by the reply of the turn that carried it
            assert runs[otid_for(t)] == runs[otid_for(answered_by)]
        else:
            assert done[t]["response_text"].startswith("(slow) I heard:")
    assert not dead_letters(r)
