"""Streaming replies (sentence chunks, per-sentence speech) and burst coalescing, end to end
against a real redis-server with fake_gateway.FakeGateway (which streams replies in 3-character
pieces, like tokens)."""

from __future__ import annotations

import asyncio
import json

import pytest
from bridge_harness import Outputs, _not, dead_letters, llen_is, make_settings, push, running, scenario, task, wait_for
from fake_gateway import FakeGateway

from bridge import check_bridge, run_bridge
from bridge.errors import LettaPermanentError
from bridge.gateway import AvatarCall, TurnResult
from vtuber_letta import redis_keys as keys

pytestmark = pytest.mark.timeout(60)

LONG = "第一句来了。Second sentence here! 第三句？The end"


def long_reply(viewer, message) -> TurnResult:
    return TurnResult(reply_text=LONG)


async def tts_requests(r) -> list[dict]:
    return [json.loads(x) for x in reversed(await r.lrange("tts_requests", 0, -1))]  # oldest first


# ---------------------------------------------------------------- streaming


@scenario
async def test_the_reply_is_published_sentence_by_sentence_before_the_final_response(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    async with Outputs(url) as out, running(settings, FakeGateway(reply=long_reply)):
        await push(r, task("t-1"))
        await wait_for(out.responses, what="final response")
    chunks = out.on("letta_response_chunks")
    assert [c["text"] for c in chunks] == ["第一句来了。", "Second sentence here!", "第三句？", "The end"]
    assert [c["index"] for c in chunks] == [0, 1, 2, 3]
    assert {(c["task_id"], c["user_id"], c["source"]) for c in chunks} == {("t-1", "bilibili:1", "letta")}
    order = [channel for channel, _ in out.messages if channel in ("letta_response_chunks", "letta_responses")]
    assert order == ["letta_response_chunks"] * 4 + ["letta_responses"]  # speech could start early
    assert out.responses()[0]["response_text"] == LONG  # the final message carries the whole reply
    assert [t["text"] for t in await tts_requests(r)] == [LONG]  # per-sentence speech is off by default


@scenario
async def test_per_sentence_speech_queues_each_sentence_once_and_not_the_whole_reply(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_TTS_PER_SENTENCE=True)
    async with Outputs(url) as out, running(settings, FakeGateway(reply=long_reply)):
        await push(r, task("t-1"))
        await wait_for(out.responses, what="final response")
    speech = await tts_requests(r)
    assert [(s["message_id"], s["sentence_index"], s["text"]) for s in speech] == [
        ("letta-t-1-0", 0, "第一句来了。"), ("letta-t-1-1", 1, "Second sentence here!"),
        ("letta-t-1-2", 2, "第三句？"), ("letta-t-1-3", 3, "The end"),
    ]
    assert {s["response_channel"] for s in speech} == {"task_response:t-1"}
    assert out.responses()[0]["response_text"] == LONG


def cue_reply(viewer, message) -> TurnResult:
    """Words, then an avatar cue (the fake's model writes its words before its calls)."""
    return TurnResult(reply_text=LONG, avatar_calls=(AvatarCall("set_expression", {"expression": "happy"}),))


@scenario
async def test_speech_gets_the_whole_reply_while_the_tools_still_run_and_only_once(r, url, tmp_path):
    await speech_before_the_tools_end(r, url, tmp_path, per_sentence=False)


@scenario
async def test_per_sentence_speech_gets_every_sentence_while_the_tools_still_run_and_only_once(r, url, tmp_path):
    await speech_before_the_tools_end(r, url, tmp_path, per_sentence=True)


async def speech_before_the_tools_end(r, url, tmp_path, *, per_sentence: bool) -> None:
    settings = make_settings(url, tmp_path, VTL_BRIDGE_TTS_PER_SENTENCE=per_sentence, VTL_BRIDGE_AVATAR_CHANNEL="avatar_out")
    gateway = FakeGateway(reply=cue_reply, hold=asyncio.Event())  # the tools "run" until hold is set
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"))
        await wait_for(lambda: r.exists(keys.task_spoken("t-1")), what="speech hand-off")
        spoken_early = await tts_requests(r)
        assert out.responses() == [] and out.on("avatar_out") == []  # the turn has not ended
        gateway.hold.set()
        await wait_for(out.responses, what="final response")
    if per_sentence:
        assert [t["text"] for t in spoken_early] == ["第一句来了。", "Second sentence here!", "第三句？", "The end"]
    else:
        assert spoken_early == [{"message_id": "letta-t-1", "task_id": "t-1", "text": LONG,
                                 "response_channel": "task_response:t-1"}]
    assert await tts_requests(r) == spoken_early  # FINISH queued nothing for speech again
    assert out.responses()[0]["response_text"] == LONG and out.on("avatar_out")[0]["args"] == {"expression": "happy"}
    assert 0 < await r.ttl(keys.task_spoken("t-1")) <= settings.bridge_done_ttl


@scenario
async def test_without_tts_the_text_only_reply_also_goes_out_before_the_tools_end(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_TTS_HANDOFF=False)
    gateway = FakeGateway(reply=cue_reply, hold=asyncio.Event())
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"))
        await wait_for(lambda: out.on("task_response:t-1"), what="text-only reply")
        assert out.responses() == []
        gateway.hold.set()
        await wait_for(out.responses, what="final response")
    assert out.on("task_response:t-1") == [{"text": LONG}]  # once
    assert await r.llen("tts_requests") == 0


@scenario
async def test_a_turn_replayed_after_its_words_went_to_speech_is_not_spoken_again(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway(reply=cue_reply, hold=asyncio.Event())  # Letta stores the turn; the bridge dies
    async with Outputs(url) as out:
        bridge_a = asyncio.create_task(run_bridge(settings, gateway, stop_event=asyncio.Event(), replica_id="a"))
        await push(r, task("t-1"))
        await wait_for(lambda: r.exists(keys.task_spoken("t-1")), what="speech hand-off")
        bridge_a.cancel()  # killed while the tools ran: no FINISH
        await asyncio.gather(bridge_a, return_exceptions=True)
        await wait_for(lambda: _not(check_bridge(settings, "a")), what="TTL expiry")
        gateway.hold = None
        async with running(settings, gateway, "b"):
            await wait_for(out.responses, what="answer")
    assert gateway.sends_of("t-1") == 1 and out.responses()[0]["response_text"] == LONG  # replayed
    assert [t["message_id"] for t in await tts_requests(r)] == ["letta-t-1"]  # spoken once


@scenario
async def test_streaming_off_publishes_no_chunks_and_a_silent_turn_none_either(r, url, tmp_path):
    silent = FakeGateway(reply=lambda viewer, m: TurnResult(reply_text="", silent=True))
    for settings, gateway in ((make_settings(url, tmp_path, VTL_BRIDGE_STREAMING=False), FakeGateway(reply=long_reply)),
                              (make_settings(url, tmp_path), silent)):
        async with Outputs(url) as out, running(settings, gateway):
            await push(r, task(f"t-{id(gateway)}"))
            await wait_for(out.responses, what="final response")
        assert out.on("letta_response_chunks") == []
        assert gateway.pieces_streamed == 0


# ---------------------------------------------------------------- burst coalescing


@scenario
async def test_a_burst_of_ten_becomes_at_most_three_turns_and_every_task_is_answered(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_COALESCE_MAX=8, VTL_BRIDGE_TTS_HANDOFF=False)
    gateway = FakeGateway(hold=asyncio.Event())
    ids = [f"b-{i}" for i in range(10)]
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task(ids[0], content="m0"))
        await asyncio.wait_for(gateway.send_started.wait(), 10)  # the first turn is running...
        await push(r, *[task(t, content=f"m{i}") for i, t in enumerate(ids) if i])  # ...and nine more arrive
        await wait_for(lambda: llen_is(r, keys.viewer_queue("bilibili:1"), 10), what="burst queued")
        gateway.hold.set()
        await wait_for(lambda: len(out.responses()) == 10, what="ten responses")
    turns = [sent.task_ids for sent in gateway.sent]
    assert len(turns) <= 3 and [t for turn in turns for t in turn] == ids  # each once, in order
    assert turns[0] == ("b-0",) and turns[1] == tuple(ids[1:9]) and turns[2] == ("b-9",)
    by_task = {x["task_id"]: x for x in out.responses()}
    assert set(by_task) == set(ids)
    for turn in turns:  # the last task of each turn carries the reply, the others say who answered them
        answering = turn[-1]
        assert by_task[answering]["response_text"] == f"echo: m{ids.index(answering)}"
        assert by_task[answering].get("answers", [answering]) == list(turn)
        for other in turn[:-1]:
            assert by_task[other]["response_text"] == "" and by_task[other]["answered_by"] == answering
            assert out.on(f"task_response:{other}") == [{"text": "", "answered_by": answering}]
        assert out.on(f"task_response:{answering}") == [{"text": f"echo: m{ids.index(answering)}"}]
    assert gateway.overlaps == 0
    assert await r.hgetall(keys.BRIDGE_ATTEMPTS) == {}
    stats = await r.hgetall(keys.viewer_stats("bilibili:1"))
    assert stats[b"messages"] == b"10"  # every coalesced message still counted once


@scenario
async def test_mid_burst_the_bridge_waits_briefly_for_the_rest_of_the_burst(r, url, tmp_path):
    turns = {}
    for wait_ms in (0, 1000):
        settings = make_settings(url, tmp_path, VTL_BRIDGE_COALESCE_MAX=8, VTL_BRIDGE_COALESCE_WAIT_MS=wait_ms)
        gateway = FakeGateway(hold=asyncio.Event())
        ids = [f"w{wait_ms}-{i}" for i in range(3)]
        async with Outputs(url) as out, running(settings, gateway):
            await push(r, task(ids[0]))
            await asyncio.wait_for(gateway.send_started.wait(), 10)
            await push(r, task(ids[1]))  # waiting behind a running turn: the viewer is mid-burst
            await wait_for(lambda: llen_is(r, keys.viewer_queue("bilibili:1"), 2), what="queued")
            gateway.hold.set()
            await asyncio.sleep(0.3)
            await push(r, task(ids[2]))  # the rest of the burst, a moment later
            await wait_for(lambda: len(out.responses()) == 3, what="three answers")
        turns[wait_ms] = [sent.task_ids for sent in gateway.sent]
    assert turns[0] == [("w0-0",), ("w0-1",), ("w0-2",)]
    assert turns[1000] == [("w1000-0",), ("w1000-1", "w1000-2")]


@scenario
async def test_a_group_never_crosses_an_event_a_bad_task_or_another_route(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_COALESCE_MAX=8)
    gateway = FakeGateway(hold=asyncio.Event())
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("c-0"))
        await asyncio.wait_for(gateway.send_started.wait(), 10)
        await push(
            r, task("c-1"), task("c-2"),
            task("e-3", type="super_chat", meta={"memory_type": "permanent", "amount": 30, "currency": "CNY"}),
            task("c-4"), task("c-5", content=None),  # bad: no content
            task("c-6"), task("c-7", meta={"memory_type": "temporary"}), task("c-8"), task("c-9"),
        )
        await wait_for(lambda: llen_is(r, keys.viewer_queue("bilibili:1"), 10), what="queued")
        gateway.hold.set()
        await wait_for(lambda: len(out.responses()) == 8, what="eight Letta answers")
        await wait_for(lambda: r.llen("user_input_queue"), what="temporary forwarded")
    assert [sent.task_ids for sent in gateway.sent] == [("c-0",), ("c-1", "c-2"), ("e-3",), ("c-4",), ("c-6",), ("c-8", "c-9")]
    assert [d["task_id"] for d in await dead_letters(r)] == ["c-5"]


@scenario
async def test_a_group_letta_refuses_is_retried_one_by_one(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_COALESCE_MAX=8)
    gateway = FakeGateway(failures=[LettaPermanentError("HTTP 400: one of these upset Letta")])
    await push(r, task("g-1"), task("g-2"), task("g-3"))
    async with Outputs(url) as out, running(settings, gateway):
        await wait_for(lambda: len(out.responses()) == 3, what="three answers")
    assert [sent.task_ids for sent in gateway.sent] == [("g-1",), ("g-2", "g-3")]
    assert await dead_letters(r) == []


@scenario
async def test_a_coalesced_turn_cut_by_a_crash_is_replayed_for_all_its_tasks_not_resent(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_COALESCE_MAX=8)
    gateway = FakeGateway(hold=asyncio.Event())  # Letta stores the turn, the reply never arrives
    await push(r, task("k-1", content="one"), task("k-2", content="two"), task("k-3", content="three"))
    async with Outputs(url) as out:
        stop_a = asyncio.Event()
        bridge_a = asyncio.create_task(run_bridge(settings, gateway, stop_event=stop_a, replica_id="a"))
        await asyncio.wait_for(gateway.send_started.wait(), 10)
        bridge_a.cancel()  # hard kill mid-turn
        await asyncio.gather(bridge_a, return_exceptions=True)
        await push(r, task("k-4", content="four"))  # arrives while nobody serves the viewer
        await wait_for(lambda: _gone(check_bridge(settings, "a")), what="TTL expiry")
        gateway.hold = None
        async with running(settings, gateway, "b"):
            await wait_for(lambda: len(out.responses()) == 4, what="all answered")
    turns = [sent.task_ids for sent in gateway.sent]
    assert [t for turn in turns for t in turn] == ["k-1", "k-2", "k-3", "k-4"]  # each sent once: replayed, not resent
    assert len(turns[0]) >= 2 and ("agent-1", "k-1") in gateway.find_calls
    by_task = {x["task_id"]: x for x in out.responses()}
    for turn in turns:
        answering = turn[-1]
        assert by_task[answering]["response_text"] == f"echo: {_word(answering)}"
        assert by_task[answering].get("answers", [answering]) == list(turn)
        assert all(by_task[other]["answered_by"] == answering for other in turn[:-1])


def _word(task_id: str) -> str:
    return {"k-1": "one", "k-2": "two", "k-3": "three", "k-4": "four"}[task_id]


async def _gone(alive) -> bool:
    return not await alive


@scenario
async def test_content_that_is_empty_once_cleaned_is_dead_lettered_and_never_sent(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_COALESCE_MAX=8)
    gateway = FakeGateway()
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("e-1", content="\x00\x01\x1b\x7f"), task("e-2", content="hi"))
        await wait_for(out.responses, what="the good task answered")
        await wait_for(lambda: dead_letters(r), what="the empty one dead-lettered")
    [letter] = await dead_letters(r)
    assert letter["task_id"] == "e-1" and letter["stage"] == "validate" and "empty" in letter["reason"]
    assert [sent.task_ids for sent in gateway.sent] == [("e-2",)] and gateway.agents == {"bilibili:1": "agent-1"}
