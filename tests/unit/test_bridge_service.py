"""The bridge end to end against a real redis-server (conftest.py) and fake_gateway.FakeGateway."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
from bridge_harness import Outputs, _not, dead_letters, llen_is, make_settings, push, running, scenario, task, wait_for
from fake_gateway import FakeGateway
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge import check_bridge, run_bridge
from bridge.errors import LettaPermanentError, LettaRetryable, LettaUnavailable
from bridge.gateway import AvatarCall, TurnMessage, TurnResult
from bridge.queue import ViewerQueues
from bridge.service import BridgeService
from vtuber_letta import redis_keys as keys

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- the happy path and output shapes


@scenario
async def test_a_chat_task_is_answered_and_spoken(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway()
    async with Outputs(url) as out, running(settings, gateway):
        before = time.time()
        await push(r, task("t-1", content="你好"))
        await wait_for(out.responses, what="letta_responses")
        await wait_for(lambda: r.llen("tts_requests"), what="tts request")
    (response,) = out.responses()
    assert response == {
        "task_id": "t-1", "user_id": "bilibili:1", "response_text": "echo: 你好", "memory_updated": False,
        "source": "letta", "timestamp": response["timestamp"], "silent": False,
    }
    assert before <= response["timestamp"] <= time.time()  # the bridge's epoch clock, not the producer's
    assert json.loads(await r.lindex("tts_requests", 0)) == {
        "message_id": "letta-t-1", "task_id": "t-1", "text": "echo: 你好", "response_channel": "task_response:t-1",
    }
    assert out.on("task_response:t-1") == []  # TTS publishes there once it has spoken
    assert gateway.sent[0].sender_name == "小明@bilibili" and gateway.sent[0].text == "你好"
    assert await r.get(keys.task_done("t-1")) == b"answered"  # how it ended, never the reply's text
    assert 0 < await r.ttl(keys.task_done("t-1")) <= settings.bridge_done_ttl
    assert await r.llen(keys.viewer_queue("bilibili:1")) == 0
    assert await r.exists(keys.viewer_active("bilibili:1"), keys.BRIDGE_PENDING, keys.BRIDGE_ATTEMPTS,
                          keys.BRIDGE_INTAKE) == 0
    assert await check_bridge(settings) is False  # graceful stop removed the heartbeat


@scenario
async def test_without_tts_handoff_the_reply_is_text_only(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_TTS_HANDOFF=False)
    async with Outputs(url) as out, running(settings, FakeGateway()):
        await push(r, task("t-1"))
        await wait_for(lambda: out.on("task_response:t-1"), what="task_response")
    assert out.on("task_response:t-1") == [{"text": "echo: hi"}]
    assert await r.llen("tts_requests") == 0


@scenario
async def test_stay_silent_produces_no_speech(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway(reply=lambda viewer, m: TurnResult(reply_text="", silent=True))
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1", content="buy followers at spam.example"))
        await wait_for(lambda: out.on("task_response:t-1"), what="silent task_response")
    assert out.responses()[0]["silent"] is True and out.responses()[0]["response_text"] == ""
    assert out.on("task_response:t-1") == [{"text": "", "silent": True}]
    assert await r.llen("tts_requests") == 0


@scenario
async def test_avatar_tool_calls_become_events(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_AVATAR_CHANNEL="avatar_out")
    calls = (AvatarCall("set_expression", {"expression": "happy", "intensity": 0.7}), AvatarCall("play_motion", {"motion": "wave"}))
    gateway = FakeGateway(reply=lambda viewer, m: TurnResult(reply_text="hello!", avatar_calls=calls))
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1", user_id="twitch:alice"))
        await wait_for(lambda: len(out.on("avatar_out")) == 2, what="avatar events")
        await wait_for(out.responses, what="response")
    events = out.on("avatar_out")
    assert [(e["tool"], e["args"]) for e in events] == [("set_expression", {"expression": "happy", "intensity": 0.7}), ("play_motion", {"motion": "wave"})]
    assert all(e["task_id"] == "t-1" and e["user_id"] == "twitch:alice" and e["type"] == "avatar" for e in events)
    assert out.on("live2d_events") == []


# ---------------------------------------------------------------- routing


@scenario
async def test_routing_temporary_permanent_and_default(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway()
    temporary = json.dumps(task("t-temp", meta={"memory_type": "temporary", "trace_id": None, "extra": [1, 2]}), ensure_ascii=False)
    no_type = task("t-default", meta={"trace_id": None})
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, temporary, task("t-perm"), no_type)
        await wait_for(lambda: len(out.responses()) == 2, what="two Letta answers")
        await wait_for(lambda: r.llen("user_input_queue"), what="forwarded task")
    assert await r.lrange("user_input_queue", 0, -1) == [temporary.encode()]  # byte for byte
    assert [m.task_ids for m in gateway.sent] == [("t-perm",), ("t-default",)]  # missing memory_type = permanent


@scenario
async def test_letta_disabled_forwards_everything(r, url, tmp_path):
    settings = make_settings(url, tmp_path, LETTA_ENABLED=False)
    gateway = FakeGateway()
    tasks = [task("t-1"), task("t-2", meta={"memory_type": "temporary"}), task("t-3", user_id="bilibili:小明")]
    async with running(settings, gateway):
        await push(r, *tasks)
        await wait_for(lambda: llen_is(r, "user_input_queue", 3), what="3 forwarded")
    forwarded = [json.loads(x) for x in await r.lrange("user_input_queue", 0, -1)]
    assert sorted(f["task_id"] for f in forwarded) == ["t-1", "t-2", "t-3"]
    assert gateway.sent == [] and gateway.agents == {}


@scenario
async def test_input_file_is_read_only_inside_uploads(r, url, tmp_path):
    uploads = tmp_path / "uploads"
    (uploads / "t-1").mkdir(parents=True)
    (uploads / "t-1" / "input.txt").write_text("从文件来", encoding="utf-8")
    settings = make_settings(url, tmp_path, VTL_BRIDGE_UPLOADS_DIR=uploads)
    gateway = FakeGateway()
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1", content=None, input_file=str(uploads / "t-1" / "input.txt")),
                   task("t-2", content=None, input_file="/etc/passwd"),
                   task("t-3", content=None, input_file=str(uploads / ".." / ".." / "etc" / "passwd")))
        await wait_for(lambda: llen_is(r, keys.BRIDGE_DEAD_LETTERS, 2), what="2 dead letters")
        await wait_for(out.responses, what="answer")
    assert [m.text for m in gateway.sent] == ["从文件来"]
    letters = await dead_letters(r)
    assert {d["task_id"] for d in letters} == {"t-2", "t-3"}
    assert all("outside the uploads folder" in d["reason"] and "root:" not in d["raw"] for d in letters)


# ---------------------------------------------------------------- dead letters


@scenario
async def test_bad_tasks_are_dead_lettered_and_good_ones_around_them_answered(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_MAX_PAYLOAD_BYTES=2048)

    def reply(viewer, message: TurnMessage) -> TurnResult:
        if message.task_id == "t-letta-bad":
            raise LettaPermanentError("HTTP 422: bad request")
        return TurnResult(reply_text=f"ok {message.task_id}")

    gateway = FakeGateway(reply=reply)
    bad = {
        "{not json": "not valid JSON",
        "[1, 2, 3]": "",  # not an object: no user_id to route by
        json.dumps(task("t-nofile", content=None)): "needs non-empty content or an input_file",
        json.dumps(task("t-big", content="x" * 3000)): "payload is",
        json.dumps(task("t-hostile", user_id="bilibili:1\r\nFLUSHALL")): "",
        json.dumps(task("../../etc/passwd")): "invalid task_id",
        json.dumps(task("t-type", type="sticker")): "invalid type",
        json.dumps(task("t-nulluser", user_id=None)): "",
        json.dumps(task("t-zwsp", user_id="bili\u200bbili:1")): "invalid user_id: contains a control or format character (U+200B)",
        json.dumps(task("t-sc", type="super_chat", meta={"currency": "CNY"})): "needs meta.amount",
        json.dumps(task("t-letta-bad")): "422",
    }
    good = [task(f"t-good-{i}") for i in range(4)]
    sequence = [good[0], *list(bad)[:5], good[1], *list(bad)[5:], good[2], good[3]]
    async with Outputs(url) as out, running(settings, gateway) as runner:
        await push(r, *sequence)
        await wait_for(lambda: len(out.responses()) == 4, what="good answers")
        await wait_for(lambda: llen_is(r, keys.BRIDGE_DEAD_LETTERS, len(bad)), what="dead letters")
        assert not runner.done()  # still running
    assert [resp["task_id"] for resp in out.responses()] == [f"t-good-{i}" for i in range(4)]
    letters = await dead_letters(r)
    by_raw = {d["raw"]: d for d in letters}
    for raw, reason_part in bad.items():
        entry = by_raw.get(raw) or next(d for d in letters if raw.startswith(d["raw"][:100]))
        assert reason_part in entry["reason"], (raw[:60], entry["reason"])
        assert entry["replica_id"] == "r1" and entry["at"] > 1e9
    assert by_raw["[1, 2, 3]"]["stage"] == "intake"
    assert by_raw[json.dumps(task("t-letta-bad"))]["stage"] == "letta"
    assert by_raw[json.dumps(task("t-type", type="sticker"))]["task_id"] == "t-type"
    assert await r.exists(keys.task_done("t-letta-bad")) == 0
    # nothing is left anywhere
    assert await r.llen(keys.BRIDGE_TRIAGE) == 0 and await r.llen(keys.BRIDGE_STAGING) == 0
    assert await r.scard(keys.BRIDGE_PENDING) == 0


@scenario
async def test_a_bridge_bug_on_one_task_dead_letters_it_and_the_next_task_is_answered(r, url, tmp_path):
    settings = make_settings(url, tmp_path)

    def reply(viewer, message: TurnMessage) -> TurnResult:
        if message.task_id == "t-poison":  # args that cannot form an AvatarEvent: a bug on our side
            return TurnResult(reply_text="x", avatar_calls=(AvatarCall("set_expression", "not a dict"),))  # type: ignore[arg-type]
        return TurnResult(reply_text="fine")

    async with Outputs(url) as out, running(settings, FakeGateway(reply=reply)):
        await push(r, task("t-poison"), task("t-next"))
        await wait_for(out.responses, what="the next answer")
    assert [x["task_id"] for x in out.responses()] == ["t-next"]
    (entry,) = await dead_letters(r)
    assert entry["stage"] == "internal" and entry["task_id"] == "t-poison" and "internal error" in entry["reason"]


# ---------------------------------------------------------------- ordering across replicas


@scenario
async def test_two_replicas_keep_each_viewers_order_and_answer_once(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_CONCURRENCY=3)
    gateway = FakeGateway(delay=(0.0, 0.004), seed=7)
    viewers = [f"bilibili:{v}" for v in range(5)]
    expected = {v: [f"{v}-m{i:02d}" for i in range(20)] for v in viewers}
    async with Outputs(url) as out, running(settings, gateway, "replica-a"), running(settings, gateway, "replica-b"):
        for i in range(20):  # interleaved viewers, pushed while both replicas are taking work
            await push(r, *[task(expected[v][i], user_id=v, content=f"message {i}") for v in viewers])
            if i % 5 == 4:
                await asyncio.sleep(0.01)
        await wait_for(lambda: len(out.responses()) >= 100, timeout=30, what="100 answers")
        await asyncio.sleep(0.2)  # anything extra would show up now
    responses = out.responses()
    assert len(responses) == 100 and len({x["task_id"] for x in responses}) == 100  # each exactly once
    for v in viewers:
        assert [t for m in gateway.sent if m.viewer_id == v for t in m.task_ids] == expected[v]  # Letta saw them in order
        assert [x["task_id"] for x in responses if x["user_id"] == v] == expected[v]  # published in order
    assert gateway.overlaps == 0  # never two turns in flight for one agent


# ---------------------------------------------------------------- crash recovery


@scenario
async def test_a_killed_bridge_loses_nothing_and_the_next_one_does_not_resend(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway(hold=asyncio.Event())  # Letta stores the turn, the reply never arrives
    stop_a = asyncio.Event()
    async with Outputs(url) as out:
        bridge_a = asyncio.create_task(run_bridge(settings, gateway, stop_event=stop_a, replica_id="a"))
        await push(r, task("t-1", content="first"), task("t-2", content="second"))
        await asyncio.wait_for(gateway.send_started.wait(), 10)
        bridge_a.cancel()  # a hard kill: no acknowledgement, the lock and heartbeat just expire
        await asyncio.gather(bridge_a, return_exceptions=True)
        assert await r.lindex(keys.viewer_queue("bilibili:1"), 0) is not None
        assert await check_bridge(settings, "a") is True  # still "alive" until the TTL runs out
        await wait_for(lambda: _not(check_bridge(settings, "a")), what="TTL expiry")
        gateway.hold = None
        async with running(settings, gateway, "b"):
            await wait_for(lambda: len(out.responses()) == 2, what="both answered")
    assert [x["task_id"] for x in out.responses()] == ["t-1", "t-2"]
    assert out.responses()[0]["response_text"] == "echo: first"
    assert gateway.sends_of("t-1") == 1  # find_answered replayed the stored turn
    assert ("agent-1", "t-1") in gateway.find_calls
    assert gateway.settled == ["agent-1"]  # the killed attempt's run was let end before the lookup
    assert gateway.sends_of("t-2") == 1 and ("agent-1", "t-2") not in gateway.find_calls  # first attempt: no lookup


@scenario
async def test_a_turn_killed_after_its_tool_step_is_finished_not_replayed_as_silence(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    # The first attempt's tools ran (an expression), then the bridge died before the agent spoke.
    half_done = TurnResult(reply_text="", silent=True, unfinished=True,
                           avatar_calls=(AvatarCall("set_expression", {"expression": "happy"}),))
    gateway = FakeGateway(reply=lambda viewer, message: half_done, hold=asyncio.Event())
    stop_a = asyncio.Event()
    async with Outputs(url) as out:
        bridge_a = asyncio.create_task(run_bridge(settings, gateway, stop_event=stop_a, replica_id="a"))
        await push(r, task("t-1", content="hi"))
        await asyncio.wait_for(gateway.send_started.wait(), 10)
        bridge_a.cancel()
        await asyncio.gather(bridge_a, return_exceptions=True)
        await wait_for(lambda: _not(check_bridge(settings, "a")), what="TTL expiry")
        gateway.hold = None
        async with running(settings, gateway, "b"):
            await wait_for(out.responses, what="answer")
    [response] = out.responses()
    assert response["task_id"] == "t-1" and response["response_text"] == "(after the tools)"
    assert gateway.sends_of("t-1") == 1  # never sent twice
    assert gateway.continued == [("agent-1", "t-1")]  # its next step was asked for instead


@scenario
async def test_losing_the_viewer_lock_stops_the_turn_in_flight_before_it_speaks_or_acknowledges(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway(hold=asyncio.Event())  # the turn is in Letta and stays there
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1", content="hi"))
        await asyncio.wait_for(gateway.send_started.wait(), 10)
        await r.delete(keys.viewer_active("bilibili:1"))  # the lock expired: another replica may take over
        # Cancelled while Letta still "runs" it (hold is never set): it neither spoke nor acknowledged.
        await wait_for(lambda: gateway.in_flight == 0, what="the turn in flight to be cancelled")
        # The viewer's next owner (here this same replica, claiming again) replays the stored turn.
        await wait_for(out.responses, what="the task answered by the next owner")
        await asyncio.sleep(0.3)
    assert [x["task_id"] for x in out.responses()] == ["t-1"]
    assert gateway.sends_of("t-1") == 1 and ("agent-1", "t-1") in gateway.find_calls
    assert await r.llen("tts_requests") == 1


@scenario
async def test_duplicate_deliveries_are_answered_once(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway()
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"), task("t-1"), task("t-2"))
        await wait_for(lambda: len(out.responses()) == 2, what="two answers")
        await wait_for(lambda: _not(r.llen(keys.viewer_queue("bilibili:1"))), what="queue drained")
    assert [x["task_id"] for x in out.responses()] == ["t-1", "t-2"]
    assert gateway.sends_of("t-1") == 1


# ---------------------------------------------------------------- Letta failures


@scenario
async def test_transient_errors_are_retried_then_answered_once(r, url, tmp_path):
    settings = make_settings(url, tmp_path, LETTA_RETRY_ATTEMPTS=3)
    gateway = FakeGateway(failures=[LettaRetryable("HTTP 429"), LettaUnavailable("connection refused")])
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"))
        await wait_for(out.responses, what="answer")
    assert out.responses()[0]["response_text"] == "echo: hi"
    assert gateway.sends_of("t-1") == 1 and len(gateway.find_calls) == 2  # attempts 2 and 3 looked first
    assert await r.hget(keys.BRIDGE_ATTEMPTS, "t-1") is None


@scenario
async def test_retry_exhausted_without_fallback_is_dead_lettered(r, url, tmp_path):
    settings = make_settings(url, tmp_path, LETTA_FALLBACK_TO_MEMORY=False, LETTA_RETRY_ATTEMPTS=1)
    gateway = FakeGateway(failures=[LettaRetryable("HTTP 500")] * 5)
    async with running(settings, gateway):
        await push(r, task("t-1"))
        await wait_for(lambda: r.llen(keys.BRIDGE_DEAD_LETTERS), what="dead letter")
    (entry,) = await dead_letters(r)
    assert entry["reason"].startswith("gave up after 2 attempts") and entry["attempts"] == 2 and entry["stage"] == "letta"


@scenario
async def test_a_500_while_letta_cannot_read_its_database_is_waited_out_not_dead_lettered(r, url, tmp_path):
    """Letta 0.16.8 answers a database outage with a bare 500, like a refusal: the failed plain read
    (`serves`) makes it "Letta cannot answer now", so with fallback off the task waits, past
    LETTA_RETRY_ATTEMPTS, and is answered once when the database is back."""
    settings = make_settings(url, tmp_path, LETTA_FALLBACK_TO_MEMORY=False, LETTA_RETRY_ATTEMPTS=1)
    gateway = FakeGateway(failures=[LettaRetryable("HTTP 500")] * 4, database_down=True)
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"))
        await wait_for(lambda: len(gateway.failures) == 0, what="four failed attempts")
        gateway.database_down = False
        await wait_for(out.responses, what="answer")
    assert [x["task_id"] for x in out.responses()] == ["t-1"] and gateway.sends_of("t-1") == 1
    assert not await dead_letters(r) and gateway.probes >= 4


@scenario
async def test_a_finish_lost_to_redis_hands_the_viewer_back_without_waiting_for_the_lock_ttl(r, url, tmp_path):
    """Redis fails as the turn is acknowledged (restarted: the lock comes back from its append-only
    file): once it answers, the worker hands the viewer back with its token, so the task (still
    at the head) is replayed from the history within seconds, not after VTL_BRIDGE_LOCK_TTL."""
    settings = make_settings(url, tmp_path, VTL_BRIDGE_LOCK_TTL=60)
    gateway = FakeGateway()
    real_finish, real_release = ViewerQueues.finish, ViewerQueues.release
    failed: list[str] = []  # the calls that met Redis away: the FINISH and the worker's own release

    async def finish_once_lost(self, viewer, *args, **kwargs):
        if not failed:
            failed.append("finish")
            raise RedisConnectionError("Connection closed by server.")
        return await real_finish(self, viewer, *args, **kwargs)

    async def release_once_lost(self, viewer, *args, **kwargs):
        if failed == ["finish"]:
            failed.append("release")
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1.")
        return await real_release(self, viewer, *args, **kwargs)

    ViewerQueues.finish, ViewerQueues.release = finish_once_lost, release_once_lost  # type: ignore[method-assign]
    try:
        async with Outputs(url) as out, running(settings, gateway):
            await push(r, task("t-1"), task("t-2"))
            started = time.monotonic()
            await wait_for(lambda: len(out.responses()) == 2, timeout=10, what="both answers")
    finally:
        ViewerQueues.finish, ViewerQueues.release = real_finish, real_release  # type: ignore[method-assign]
    assert failed == ["finish", "release"]
    assert time.monotonic() - started < 10  # well within the lock TTL of 60 s
    assert [x["task_id"] for x in out.responses()] == ["t-1", "t-2"]
    assert gateway.sends_of("t-1") == 1 and gateway.sends_of("t-2") == 1  # t-1 replayed, not sent again


@scenario
async def test_a_500_right_after_an_outage_gets_its_own_retries(r, url, tmp_path):
    """The call met the outage's end, the probe the recovery: LETTA_RETRY_ATTEMPTS counts refusals
    by a Letta that serves, so the attempts spent waiting for it do not use them up."""
    settings = make_settings(url, tmp_path, LETTA_FALLBACK_TO_MEMORY=False, LETTA_RETRY_ATTEMPTS=1)
    gateway = FakeGateway(failures=[LettaUnavailable("connection refused")] * 2 + [LettaRetryable("HTTP 500")])
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"))
        await wait_for(out.responses, what="answer")
    assert gateway.sends_of("t-1") == 1 and not await dead_letters(r)


@scenario
async def test_letta_down_with_fallback_goes_to_memory_then_recovers(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway(down=True)
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"), task("t-2", user_id="bilibili:2"))
        await wait_for(lambda: llen_is(r, "user_input_queue", 2), what="fallback")
        forwarded = [json.loads(x) for x in await r.lrange("user_input_queue", 0, -1)]
        assert sorted(f["task_id"] for f in forwarded) == ["t-1", "t-2"]
        assert all(f["meta"]["letta_fallback"] is True and f["meta"]["display_name"] == "小明" for f in forwarded)
        assert out.responses() == []
        gateway.down = False
        await asyncio.sleep(settings.bridge_letta_down_hold + 0.05)
        await push(r, task("t-3"))
        await wait_for(out.responses, what="answer after recovery")
    assert [x["task_id"] for x in out.responses()] == ["t-3"]
    assert await r.llen("user_input_queue") == 2


@scenario
async def test_letta_down_without_fallback_waits_and_completes_after_recovery(r, url, tmp_path):
    settings = make_settings(url, tmp_path, LETTA_FALLBACK_TO_MEMORY=False)
    gateway = FakeGateway(down=True)
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"), task("t-2"))
        await wait_for(lambda: _attempts_over(r, "t-1", 4), what="retries")
        assert out.responses() == [] and await r.llen("user_input_queue") == 0 and await r.llen(keys.BRIDGE_DEAD_LETTERS) == 0
        gateway.down = False
        await wait_for(lambda: len(out.responses()) == 2, what="answers after recovery")
    assert [x["task_id"] for x in out.responses()] == ["t-1", "t-2"]


async def _attempts_over(r: Redis, task_id: str, n: int) -> bool:
    value = await r.hget(keys.BRIDGE_ATTEMPTS, task_id)
    return value is not None and int(value) > n


# ---------------------------------------------------------------- live events


@scenario
async def test_live_events_are_recorded_as_verified_facts_and_the_agent_reacts(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_EVENT_TURNS=["super_chat", "gift"])
    gateway = FakeGateway()
    sc = task("sc-1", type="super_chat", content="主播加油", meta={"amount": 30, "currency": "CNY", "display_name": "小明"})
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, task("t-1"), sc, sc, task("in-1", type="enter", content=None),
                   task("g-1", type="gift", content=None, meta={"gift_name": "小心心", "count": 2, "amount": 0.2, "currency": "CNY"}))
        await wait_for(lambda: len(out.responses()) == 4, what="4 responses")
    assert [m.text for m in gateway.sent] == ["hi", "[platform event: super chat ¥30] 主播加油", "[platform event: gift 小心心 ×2 (¥0.2)]"]
    by_task = {x["task_id"]: x for x in out.responses()}
    assert by_task["sc-1"]["memory_updated"] is True and by_task["t-1"]["memory_updated"] is False
    assert by_task["in-1"]["silent"] is True and by_task["in-1"]["memory_updated"] is True  # recorded, no turn
    kinds = [(e.kind, e.task_id) for _, e in gateway.events]
    assert kinds == [("super_chat", "sc-1"), ("enter", "in-1"), ("gift", "g-1")]  # the duplicate sc-1 was not re-recorded
    last = gateway.events[-1][1].totals
    assert (last.visits, last.messages, last.super_chats, last.gifts) == (1, 1, 1, 2)
    assert last.as_block_fields()["total_support"] == "30.2 CNY"
    stats = await r.hgetall(keys.viewer_stats("bilibili:1"))
    assert float(stats[b"support:CNY"]) == pytest.approx(30.2)


# ---------------------------------------------------------------- operations


@scenario
async def test_check_bridge_follows_the_heartbeat(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    assert await check_bridge(settings) is False
    async with running(settings, FakeGateway(), "r-check"):
        assert await check_bridge(settings) is True
        assert await check_bridge(settings, "r-check") is True
        assert await check_bridge(settings, "someone-else") is False
    assert await check_bridge(settings) is False
    dead = make_settings("redis://127.0.0.1:9/0", tmp_path)
    assert await check_bridge(dead) is False


@scenario
async def test_graceful_stop_finishes_the_turn_in_flight_and_takes_no_more(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway(hold=asyncio.Event())
    stop = asyncio.Event()
    async with Outputs(url) as out:
        runner = asyncio.create_task(run_bridge(settings, gateway, stop_event=stop, replica_id="g"))
        await push(r, task("t-1"), task("t-2"))
        await asyncio.wait_for(gateway.send_started.wait(), 10)
        stop.set()
        await asyncio.sleep(0.2)
        assert not runner.done()  # waiting for the turn in flight
        gateway.hold.set()
        await asyncio.wait_for(runner, 5)
        await wait_for(out.responses, what="the in-flight answer")
    assert [x["task_id"] for x in out.responses()] == ["t-1"]
    assert await r.lrange(keys.viewer_queue("bilibili:1"), 0, -1) == [json.dumps(task("t-2"), ensure_ascii=False).encode()]
    assert await r.lrange(keys.BRIDGE_READY, 0, -1) == [b"bilibili:1"]  # handed back for another replica
    assert await check_bridge(settings, "g") is False


@scenario
async def test_at_most_concurrency_viewers_are_served_at_once_and_all_are_answered(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_CONCURRENCY=3)
    gateway = FakeGateway(delay=(0.05, 0.1))
    tasks = [task(f"t-{v}-{n}", user_id=f"bilibili:{v}") for n in range(2) for v in range(10)]
    async with Outputs(url) as out, running(settings, gateway):
        await push(r, *tasks)
        await wait_for(lambda: len(out.responses()) == len(tasks), what="every answer")
    assert gateway.max_in_flight == 3  # the cap is reached (10 viewers wait) and never passed
    assert gateway.overlaps == 0
    for v in range(10):
        assert [x["task_id"] for x in out.responses() if x["user_id"] == f"bilibili:{v}"] == [f"t-{v}-0", f"t-{v}-1"]


@scenario
async def test_an_idle_bridge_polls_the_ready_list_once_per_timeout_not_once_per_slot(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_CONCURRENCY=8)
    poll = settings.bridge_poll_timeout

    async def blpop_calls() -> int:
        return int((await r.info("commandstats")).get("cmdstat_blpop", {}).get("calls", 0))

    async with running(settings, FakeGateway()):
        before = await blpop_calls()
        await asyncio.sleep(20 * poll)
        polls = await blpop_calls() - before
    assert 10 <= polls <= 30, polls  # ~20 with one waiting BLPOP; 8 idle slots polling would make ~160


@scenario
async def test_metrics_endpoint(r, url, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(url, tmp_path, VTL_BRIDGE_METRICS_PORT=port)
    redis = Redis.from_url(url)
    service = BridgeService(settings, redis, FakeGateway(), replica_id="m")
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run(stop))
    try:
        await push(r, task("t-1"), "{bad")
        await wait_for(lambda: service.metrics.outcomes.labels("answered")._value.get() == 1, what="answered metric")
        await asyncio.sleep(0.3)  # one sweep refreshes the gauges
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await redis.aclose()
    assert 'vtl_bridge_tasks_total{outcome="answered"} 1.0' in body
    assert 'vtl_bridge_tasks_total{outcome="dead_letter"} 1.0' in body
    assert 'vtl_bridge_letta_seconds_count{op="send_turn"} 1.0' in body
    assert "vtl_bridge_dead_letter_depth 1.0" in body
    assert "vtl_bridge_in_flight_turns 0.0" in body
    assert 'vtl_bridge_queue_depth{queue="requests"} 0.0' in body
    assert "vtl_bridge_known_viewers" in body


def test_one_log_line_per_task_without_secrets(redis_url, tmp_path, caplog):
    settings = make_settings(redis_url, tmp_path, LETTA_API_KEY="s3cret-password", REDIS_URL=redis_url)

    async def main():
        r = Redis.from_url(redis_url)
        try:
            async with Outputs(redis_url) as out, running(settings, FakeGateway()):
                await push(r, task("t-1"), task("t-2", type="sticker"))
                await wait_for(out.responses, what="answer")
                await wait_for(lambda: r.llen(keys.BRIDGE_DEAD_LETTERS), what="dead letter")
        finally:
            await r.aclose()

    with caplog.at_level("INFO", logger="vtuber_letta.bridge"):
        asyncio.run(main())
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("task=")]
    (answered,) = [line for line in lines if line.startswith("task=t-1 ")]
    assert "viewer=bilibili:1" in answered and "attempt=1" in answered and "outcome=answered" in answered
    assert "duration_ms=" in answered
    (dead,) = [line for line in lines if line.startswith("task=t-2 ")]
    assert "outcome=dead_letter" in dead
    assert "s3cret-password" not in caplog.text


# ---------------------------------------------------------------- forget me: the bridge's side


@scenario
async def test_done_markers_are_indexed_per_viewer_for_forget(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    async with running(settings, FakeGateway()):
        await push(r, task("t-ix-1", content="a"), task("t-ix-2", content="b"))
        await wait_for(lambda: r.exists(keys.task_done("t-ix-2")), what="both answered")
    assert await r.smembers(keys.viewer_tasks("bilibili:1")) == {b"t-ix-1", b"t-ix-2"}
    assert 0 < await r.ttl(keys.viewer_tasks("bilibili:1")) <= settings.bridge_done_ttl


@scenario
async def test_a_forgotten_viewer_announced_on_pubsub_loses_its_cached_agent(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    gateway = FakeGateway()
    async with running(settings, gateway):
        await push(r, task("t-fg-1", content="a"))
        await wait_for(lambda: r.exists(keys.task_done("t-fg-1")), what="the first task")
        first = gateway.agents["bilibili:1"]

        async def dropped():
            await r.publish(keys.AGENT_INVALIDATIONS, "bilibili:1")
            return "bilibili:1" not in gateway.agents

        await wait_for(dropped, what="the cached agent to be dropped")
        await push(r, task("t-fg-2", content="b"))
        await wait_for(lambda: r.exists(keys.task_done("t-fg-2")), what="the second task")
    assert gateway.agents["bilibili:1"] != first
