"""The bridge's bounds, on a real redis-server (conftest.py): stale chat (the intake stamp and the
`stale` outcome), the per-viewer queue cap, done markers without reply text, and dead letters
bounded in bytes (the byte counter kept by every script that adds or removes one)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import pytest
import redis as redis_sync
from bridge_harness import Outputs, make_settings, push, scenario, task, wait_for
from fake_gateway import FakeGateway
from redis.asyncio import Redis

from bridge.gateway import TurnResult
from bridge.queue import Finished, Output, Routed, ViewerQueues
from bridge.service import BridgeService
from bridge.wire import DeadLetter
from console.errors import ConsoleError
from console.live import send_again
from vtuber_letta import redis_keys as keys
from vtuber_letta.dead_letter_list import REMOVE_DEAD_LETTER

V = "bilibili:42"


def queues(r, **overrides) -> ViewerQueues:
    values: dict = dict(request_queue="letta_requests", max_payload_bytes=4096, dead_letter_max=100)
    values.update(overrides)
    return ViewerQueues(r, **values)


def payload(task_id: str | None, kind: str = "text", viewer: str = V) -> bytes:
    body = {"type": kind, "user_id": viewer, "content": "hi", "timestamp": 1.0}  # the producer's clock: ignored
    if task_id is not None:
        body["task_id"] = task_id
    return json.dumps(body).encode()


async def server_ms(r) -> int:
    seconds, micros = await r.time()
    return seconds * 1000 + micros // 1000


async def route(r, q: ViewerQueues, *payloads: bytes) -> Routed:
    await r.lpush("letta_requests", *payloads)
    return await q.route_all()


async def total_bytes(r) -> tuple[int, int]:
    """(the byte counter, the sum of the dead letters' lengths): must always be equal."""
    entries = await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1)
    return int(await r.get(keys.BRIDGE_DEAD_LETTER_BYTES) or 0), sum(len(e) for e in entries)


# ---------------------------------------------------------------- intake stamps and ages

@scenario
async def test_route_stamps_each_task_with_the_server_clock_and_finish_deletes_the_stamp(r, url, tmp_path):
    q = queues(r)
    before = await server_ms(r)
    assert await route(r, q, payload("t1"), payload(None)) == Routed(2, 0)
    after = await server_ms(r)
    stamps = await r.hgetall(keys.BRIDGE_INTAKE)
    assert list(stamps) == [b"t1"] and before <= int(stamps[b"t1"]) <= after  # no id, no stamp
    await asyncio.sleep(0.01)
    await route(r, q, payload("t1"))  # a re-delivery while the first is queued keeps the first stamp
    assert await r.hget(keys.BRIDGE_INTAKE, "t1") == stamps[b"t1"]

    assert await q.claim(V, "A", 5000, peek=3) is not None
    # the worker could not read the id (a payload it refuses): the stamp goes all the same
    await q.finish(V, "A", [Finished(payload("t1"), None, None), Finished(payload(None), None, None)],
                   done_ttl=60, outputs=[], peek=1)
    assert await r.hlen(keys.BRIDGE_INTAKE) == 0


@scenario
async def test_ages_are_told_by_the_server_clock_with_whether_a_turn_was_attempted(r, url, tmp_path):
    q = queues(r)
    now = await server_ms(r)
    await r.hset(keys.BRIDGE_INTAKE, mapping={"old": now - 5000, "tried": now - 1000})
    await r.hset(keys.BRIDGE_ATTEMPTS, "tried", 1)
    old, tried, unknown = await q.ages(["old", "tried", "unknown"])
    assert 5.0 <= old.waited_s < 6.0 and not old.attempted
    assert 1.0 <= tried.waited_s < 2.0 and tried.attempted
    assert unknown.waited_s is None and not unknown.attempted


# ---------------------------------------------------------------- the per-viewer cap

@scenario
async def test_a_full_viewer_queue_refuses_the_next_chat_but_still_queues_live_events(r, url, tmp_path):
    q = queues(r, viewer_queue_max=50, replica_id="r9")
    assert await route(r, q, *[payload(f"c-{i}") for i in range(1, 51)]) == Routed(50, 0)
    refused = [payload("c-51"), payload("a-52", kind="audio")]
    events = [payload("g-1", kind="gift"), payload("s-1", kind="super_chat"), payload("m-1", kind="membership")]
    routed = await route(r, q, refused[0], events[0], refused[1], events[1], events[2], payload("o-1", viewer="bilibili:7"))
    assert routed == Routed(4, 0, (("c-51", V), ("a-52", V)))
    queue = await r.lrange(keys.viewer_queue(V), 0, -1)
    assert len(queue) == 53 and queue[50:] == events  # events go past the cap, in order
    assert await r.llen(keys.viewer_queue("bilibili:7")) == 1  # another viewer is not affected
    assert await r.hexists(keys.BRIDGE_INTAKE, "c-51") == 0
    letters = [DeadLetter.model_validate_json(e) for e in reversed(await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1))]
    assert [(d.task_id, d.user_id, d.reason, d.stage, d.replica_id) for d in letters] == [
        ("c-51", V, "viewer queue full (50 tasks)", "intake", "r9"), ("a-52", V, "viewer queue full (50 tasks)", "intake", "r9")]
    assert [d.raw.encode() for d in letters] == refused  # the payload as sent: "send again" sends the same task
    seconds, micros = await r.time()  # in µs, as the script stamps `at` (ms would be before it in the same ms)
    now = seconds + micros / 1_000_000
    assert all(now - 5 < d.at <= now for d in letters)
    assert await total_bytes(r) == (sum(len(e) for e in await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1)),) * 2


@scenario
async def test_the_bridge_counts_a_refused_chat_and_answers_the_rest(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_VIEWER_QUEUE_MAX=2)
    gateway = FakeGateway(hold=asyncio.Event())  # the first turn waits: the queue fills behind it
    async with serving(settings, gateway) as service:
        await push(r, task("q-1"))
        await wait_for(gateway.send_started.wait, what="the first turn")
        await push(r, task("q-2"), task("q-3"), task("q-g", content=None, **GIFT))
        await wait_for(lambda: r.llen(keys.BRIDGE_DEAD_LETTERS), what="the refused chat")
        gateway.hold.set()
        await wait_for(lambda: service.metrics.outcomes.labels("answered")._value.get() == 3, what="three answers")
    assert [json.loads(e)["task_id"] for e in await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1)] == ["q-3"]
    assert service.metrics.outcomes.labels("dead_letter")._value.get() == 1
    assert sorted(t for turn in gateway.sent for t in turn.task_ids) == ["q-1", "q-2", "q-g"]


# ---------------------------------------------------------------- dead letters bounded in bytes

@scenario
async def test_every_script_that_dead_letters_keeps_the_list_within_its_bytes(r, url, tmp_path):
    q = queues(r, dead_letters_max_bytes=1000, viewer_queue_max=1)
    for i in range(6):
        await r.rpush(keys.viewer_queue(V), payload(f"t{i}"))
    await q.claim(V, "A", 5000, peek=1)
    sizes = []
    for i in range(6):  # FINISH's dead_letter output: 300-byte entries, at most 3 fit in 1000 bytes
        entry = f"finish-{i}-".ljust(300, "x")
        await q.finish(V, "A", [Finished(payload(f"t{i}"), f"t{i}", None)], done_ttl=60, peek=1,
                       outputs=[Output("dead_letter", keys.BRIDGE_DEAD_LETTERS, entry)])
        counter, held = await total_bytes(r)
        sizes.append(counter)
        assert counter == held <= 1000
    assert sizes == [300, 600, 900, 900, 900, 900]
    assert [e[:9] for e in await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1)] == [b"finish-5-", b"finish-4-", b"finish-3-"]

    await r.lpush(keys.BRIDGE_TRIAGE, b"bad")  # the triage's dead letter: the same helper
    assert await q.dead_letter_triage(b"bad", "triage-".ljust(500, "y"))
    assert await total_bytes(r) == (800, 800)  # 500 + the newest 300

    await route(r, q, payload("c-1"), payload("c-2"))  # ROUTE's refusal (queue cap 1): the same helper
    counter, held = await total_bytes(r)
    assert counter == held <= 1000 and json.loads(await r.lindex(keys.BRIDGE_DEAD_LETTERS, 0))["task_id"] == "c-2"

    huge = "h" * 1500  # one entry over the bound on its own: the newest is always kept
    await r.lpush(keys.BRIDGE_TRIAGE, b"x")
    assert await q.dead_letter_triage(b"x", huge)
    assert await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1) == [huge.encode()] and await total_bytes(r) == (1500, 1500)


@scenario
async def test_the_count_bound_holds_with_the_byte_bound(r, url, tmp_path):
    q = queues(r, dead_letter_max=2)
    for i in range(4):
        await r.lpush(keys.BRIDGE_TRIAGE, b"bad")
        await q.dead_letter_triage(b"bad", f"e{i}")
    assert await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1) == [b"e3", b"e2"] and await total_bytes(r) == (4, 4)


def letter(task_id: str, viewer: str = "bilibili:1") -> str:
    return DeadLetter(reason="Letta refused it", raw=json.dumps(task(task_id, user_id=viewer)), task_id=task_id,
                      user_id=viewer, stage="letta", replica_id="r1", at=1.0).model_dump_json()


@scenario
async def test_the_byte_counter_is_rebuilt_once_and_kept_by_send_again_and_forget(r, url, tmp_path):
    old = [letter(f"old-{i}") for i in range(3)]
    await r.lpush(keys.BRIDGE_DEAD_LETTERS, *old)  # written by a bridge without the counter
    q = queues(r)
    await r.lpush(keys.BRIDGE_TRIAGE, b"bad")
    await q.dead_letter_triage(b"bad", letter("new"))
    counter, held = await total_bytes(r)
    assert counter == held == sum(len(e) for e in old) + len(letter("new"))

    settings = make_settings(url, tmp_path)
    await send_again(r, settings, old[0])  # the console's "send again"
    with pytest.raises(ConsoleError):  # a second click: nothing moves, the counter neither
        await send_again(r, settings, old[0])
    assert await r.llen(keys.BRIDGE_DEAD_LETTERS) == 3 and await r.llen("letta_requests") == 1
    counter, held = await total_bytes(r)
    assert counter == held

    sync = redis_sync.Redis.from_url(url)  # what `agent forget` runs for each of a viewer's dead letters
    try:
        assert sync.eval(REMOVE_DEAD_LETTER, 2, keys.BRIDGE_DEAD_LETTERS, keys.BRIDGE_DEAD_LETTER_BYTES, old[1]) == 1
        assert sync.eval(REMOVE_DEAD_LETTER, 2, keys.BRIDGE_DEAD_LETTERS, keys.BRIDGE_DEAD_LETTER_BYTES, old[1]) == 0
    finally:
        sync.close()
    counter, held = await total_bytes(r)
    assert counter == held == len(old[2]) + len(letter("new"))
    await r.delete(keys.BRIDGE_DEAD_LETTER_BYTES)  # a removal without a counter never makes one up
    sync = redis_sync.Redis.from_url(url)
    try:
        sync.eval(REMOVE_DEAD_LETTER, 2, keys.BRIDGE_DEAD_LETTERS, keys.BRIDGE_DEAD_LETTER_BYTES, old[2])
    finally:
        sync.close()
    assert await r.exists(keys.BRIDGE_DEAD_LETTER_BYTES) == 0


# ---------------------------------------------------------------- stale chat, through the bridge

@asynccontextmanager
async def serving(settings, gateway: FakeGateway):
    """One replica in-process, its metrics readable (BridgeService, not run_bridge)."""
    redis = Redis.from_url(settings.redis_url)
    service = BridgeService(settings, redis, gateway, replica_id="r1")
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await redis.aclose()


async def route_now(r, settings, *tasks: dict) -> None:
    """Queue tasks as a replica's intake would, while no bridge runs (their stamps start now)."""
    await push(r, *tasks)
    await queues(r, max_payload_bytes=settings.bridge_max_payload_bytes).route_all()


GIFT = {"type": "gift", "meta": {"gift_name": "rose", "count": 1, "display_name": "小明"}}


@scenario
async def test_stale_chat_ends_stale_while_fresh_chat_and_a_late_gift_are_answered(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_STALE_CHAT_AFTER=0.5, VTL_BRIDGE_COALESCE_MAX=8,
                             VTL_BRIDGE_TURNS_PER_CLAIM=20)
    await route_now(r, settings, task("s-1", content="old one"), task("s-2", content="old two"),
                    task("g-1", content=None, **GIFT), task("s-3", content="old three"))
    await asyncio.sleep(0.7)  # the four wait past VTL_BRIDGE_STALE_CHAT_AFTER
    await route_now(r, settings, task("f-1", content="new one"), task("f-2", content="new two"))
    gateway = FakeGateway()
    async with Outputs(url) as out, serving(settings, gateway) as service:
        await wait_for(lambda: r.exists(keys.task_done("f-2")), what="the fresh chat answered")
        await wait_for(lambda: len(out.responses()) == 6 and out.on("task_response:s-3"), what="every record")
    assert [turn.task_ids for turn in gateway.sent] == [("g-1",), ("f-1", "f-2")]  # the fresh burst: one turn
    assert [event.task_id for _, event in gateway.events] == ["g-1"]  # the gift's support is recorded
    records = {m["task_id"]: m for m in out.responses()}
    for stale in ("s-1", "s-2", "s-3"):
        assert records[stale]["stale"] is True and records[stale]["response_text"] == ""
        assert out.on(f"task_response:{stale}") == [{"text": "", "stale": True}]
        assert await r.get(keys.task_done(stale)) == b"stale"
    assert "stale" not in records["g-1"] and "stale" not in records["f-2"]
    assert records["f-2"]["answers"] == ["f-1", "f-2"]
    assert {t: await r.get(keys.task_done(t)) for t in ("g-1", "f-1", "f-2")} == {
        "g-1": b"answered", "f-1": b"coalesced", "f-2": b"answered"}  # the outcome word, never the reply
    assert service.metrics.outcomes.labels("stale")._value.get() == 3
    assert await r.lrange("tts_requests", 0, -1) != [] and all(
        json.loads(x)["task_id"] in ("g-1", "f-2") for x in await r.lrange("tts_requests", 0, -1))
    assert await r.hlen(keys.BRIDGE_INTAKE) == 0 and await r.llen(keys.BRIDGE_DEAD_LETTERS) == 0


@scenario
async def test_a_stale_chat_attempted_before_ends_stale_only_when_no_attempt_reached_the_agent(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_STALE_CHAT_AFTER=0.5)
    gateway = FakeGateway()
    gateway.agents["bilibili:1"], gateway.made = "agent-1", 1
    # a replica that died had sent a-1 (its turn is in the agent's history) and tried a-2 (never arrived)
    gateway.history["agent-1"] = {"a-1": TurnResult(reply_text="the stored answer", answered=("a-1",))}
    await route_now(r, settings, task("a-1"), task("a-2"), task("a-3"))
    await r.hset(keys.BRIDGE_ATTEMPTS, mapping={"a-1": 1, "a-2": 1})
    await asyncio.sleep(0.7)
    async with Outputs(url) as out, serving(settings, gateway) as service:
        await wait_for(lambda: r.exists(keys.task_done("a-3")), what="the three tasks")
        await wait_for(lambda: len(out.responses()) == 3, what="three records")
    records = {m["task_id"]: m for m in out.responses()}
    assert records["a-1"]["response_text"] == "the stored answer"  # replayed: the agent already said it
    assert records["a-2"]["stale"] is True and records["a-3"]["stale"] is True
    assert gateway.sent == [] and [task_id for _, task_id in gateway.find_calls] == ["a-1", "a-2"]
    assert {t: await r.get(keys.task_done(t)) for t in ("a-1", "a-2", "a-3")} == {
        "a-1": b"replayed", "a-2": b"stale", "a-3": b"stale"}
    assert service.metrics.outcomes.labels("stale")._value.get() == 2


@scenario
async def test_no_chat_is_stale_when_the_limit_is_off(r, url, tmp_path):
    settings = make_settings(url, tmp_path, VTL_BRIDGE_STALE_CHAT_AFTER=0)
    await route_now(r, settings, task("z-1"))
    now = await server_ms(r)
    await r.hset(keys.BRIDGE_INTAKE, "z-1", now - 3_600_000)  # an hour in the queue
    gateway = FakeGateway()
    async with serving(settings, gateway):
        await wait_for(lambda: r.exists(keys.task_done("z-1")), what="the chat")
    assert gateway.sends_of("z-1") == 1 and await r.get(keys.task_done("z-1")) == b"answered"


def test_agent_forget_removes_the_viewers_dead_letters_and_stamps_and_keeps_the_counter(redis_url, tmp_path):
    from provisioning.forget import Forgetter

    settings = make_settings(redis_url, tmp_path)
    r = redis_sync.Redis.from_url(redis_url)
    try:
        mine, other = letter("mine"), letter("theirs", viewer="bilibili:2")
        r.lpush(keys.BRIDGE_TRIAGE, b"a", b"b")
        for raw, entry in ((b"a", mine), (b"b", other)):  # written by the bridge's script, counter and all
            asyncio.run(_triage_once(redis_url, raw, entry))
        r.rpush(keys.viewer_queue("bilibili:1"), json.dumps(task("queued")))
        r.hset(keys.BRIDGE_INTAKE, mapping={"queued": 1, "elsewhere": 2})
        report = Forgetter(settings, None, r, creation_lock_ttl=5, lock_wait=1).run("bilibili:1", lambda: [], set())
        assert report.removed["dead_letters"] == 1
        assert r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1) == [other.encode()]
        assert int(r.get(keys.BRIDGE_DEAD_LETTER_BYTES)) == len(other)
        assert r.hkeys(keys.BRIDGE_INTAKE) == [b"elsewhere"]  # the queued task's stamp went with it
    finally:
        r.close()


async def _triage_once(url: str, raw: bytes, entry: str) -> None:
    r = Redis.from_url(url)
    try:
        assert await queues(r).dead_letter_triage(raw, entry)
    finally:
        await r.aclose()
