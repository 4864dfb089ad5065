"""Every Lua script of bridge/queue.py and vtuber_letta/viewer_lock.py on its own, against a real redis-server (conftest.py).

The scripts carry the bridge's guarantees (nothing lost, order per viewer, one turn per viewer,
no second answer), so each one is driven here case by case, including the crash points between
CLAIM and FINISH: a worker whose lock expired, the sweeper handing its viewer on, and the old
worker coming back with a stale token.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis as redis_sync
from bridge_harness import scenario
from redis.exceptions import ResponseError

from bridge.queue import Finished, FinishStatus, Output, ReleaseStatus, Routed, ViewerQueues
from vtuber_letta import redis_keys as keys
from vtuber_letta.viewer_lock import ViewerHold

V = "bilibili:42"


def queues(r, dead_letter_max: int = 100) -> ViewerQueues:
    return ViewerQueues(r, request_queue="letta_requests", max_payload_bytes=256, dead_letter_max=dead_letter_max)


def raw(task_id: str, user_id: object = V) -> bytes:
    return json.dumps({"task_id": task_id, "user_id": user_id}).encode()


async def queue_of(r, viewer: str = V) -> list[bytes]:
    return await r.lrange(keys.viewer_queue(viewer), 0, -1)


async def ready(r) -> list[str]:
    return [v.decode() for v in await r.lrange(keys.BRIDGE_READY, 0, -1)]


async def pending(r) -> set[str]:
    return {v.decode() for v in await r.smembers(keys.BRIDGE_PENDING)}


async def route_one(r, payload: bytes) -> Routed:
    await r.lpush("letta_requests", payload)
    return await queues(r).route_all()


# ---- ROUTE ----

ROUTE_CASES = [
    # (payload, routed?) — only a JSON object with a valid string user_id reaches a viewer queue
    (raw("t1"), True),
    (raw("t1", user_id="youtube:UC123/x.y 🎉"), True),
    (b"not json", False),
    (b"[1, 2]", False),
    (json.dumps({"task_id": "t1"}).encode(), False),  # no user_id
    (raw("t1", user_id=42), False),  # not a string
    (raw("t1", user_id=""), False),
    (raw("t1", user_id="   "), False),
    (raw("t1", user_id="evil\u202eid"), False),  # a format character
    (raw("t1", user_id="x\ny"), False),  # a control character
    (json.dumps({"user_id": V, "pad": "x" * 300}).encode(), False),  # over max_payload_bytes
]


@pytest.mark.parametrize("payload, routed", ROUTE_CASES)
def test_route_places_a_payload_in_its_viewer_queue_or_in_triage(redis_url, tmp_path, payload, routed):
    @scenario
    async def body(r, url, tmp):
        assert await route_one(r, payload) == (Routed(1, 0) if routed else Routed(0, 1))
        if routed:
            viewer = json.loads(payload)["user_id"]
            assert await queue_of(r, viewer) == [payload]
            assert await pending(r) == {viewer} and await ready(r) == [viewer]
            assert await r.llen(keys.BRIDGE_TRIAGE) == 0
        else:
            assert await r.lrange(keys.BRIDGE_TRIAGE, 0, -1) == [payload]
            assert await pending(r) == set() and await ready(r) == []
        assert await r.llen(keys.BRIDGE_STAGING) == 0 and await r.llen("letta_requests") == 0

    body(redis_url, tmp_path)


@scenario
async def test_route_keeps_order_staging_first_then_the_request_list(r, url, tmp_path):
    await r.lpush(keys.BRIDGE_STAGING, raw("a1"))  # moved to staging earlier: the oldest
    for task_id in ("a2", "a3", "a4"):
        await r.lpush("letta_requests", raw(task_id))  # LPUSH: the right end is the oldest
    assert await queues(r).route_all(batch=2) == Routed(4, 0)  # two script calls of two
    assert [json.loads(x)["task_id"] for x in await queue_of(r)] == ["a1", "a2", "a3", "a4"]
    assert await ready(r) == [V]  # readied once, not once per task


@scenario
async def test_route_does_not_ready_a_viewer_someone_holds(r, url, tmp_path):
    await r.set(keys.viewer_active(V), "token")
    assert await route_one(r, raw("t1")) == Routed(1, 0)
    assert await ready(r) == [] and await pending(r) == {V}  # the holder sees it; the sweeper too


@scenario
async def test_take_moves_the_oldest_request_to_staging(r, url, tmp_path):
    q = queues(r)
    assert await q.take(timeout=0.05) is False
    await r.lpush("letta_requests", b"old", b"new")
    assert await q.take(timeout=0.05) is True
    assert await r.lrange(keys.BRIDGE_STAGING, 0, -1) == [b"old"]


# ---- CLAIM / RENEW ----

@scenario
async def test_claim_takes_a_free_viewer_once_and_reads_its_head(r, url, tmp_path):
    q = queues(r)
    for task_id in ("t1", "t2", "t3"):
        await r.rpush(keys.viewer_queue(V), raw(task_id))
    assert await q.claim(V, "A", 5000, peek=2) == [raw("t1"), raw("t2")]
    assert await q.claim(V, "B", 5000, peek=2) is None  # held: a second worker gets nothing
    assert await r.get(keys.viewer_active(V)) == b"A"
    assert await q.claim("bilibili:empty", "C", 5000, peek=0) == []  # claimed, nothing queued (not None)


@scenario
async def test_renew_extends_only_the_holders_lock(r, url, tmp_path):
    q = queues(r)
    await q.claim(V, "A", 200, peek=1)
    assert await q.renew(V, "B", 60_000) is False
    assert 0 < await r.pttl(keys.viewer_active(V)) <= 200
    assert await q.renew(V, "A", 60_000) is True
    assert await r.pttl(keys.viewer_active(V)) > 1000
    await r.delete(keys.viewer_active(V))
    assert await q.renew(V, "A", 60_000) is False  # expired: renewing does not bring it back
    assert await r.exists(keys.viewer_active(V)) == 0


# ---- FINISH ----

async def setup_viewer(r, *task_ids: str, token: str = "A") -> ViewerQueues:
    q = queues(r)
    for task_id in task_ids:
        await r.rpush(keys.viewer_queue(V), raw(task_id))
    await r.sadd(keys.BRIDGE_PENDING, V)
    for task_id in task_ids:
        await r.hset(keys.BRIDGE_ATTEMPTS, task_id, 1)
        await r.hset(keys.BRIDGE_COUNTED, task_id, 1)
    assert await q.claim(V, token, 5000, peek=1) is not None
    return q


def done(task_id: str) -> Finished:
    return Finished(raw=raw(task_id), task_id=task_id, done_value="1")


@scenario
async def test_finish_pops_writes_outputs_marks_done_and_releases_an_empty_queue(r, url, tmp_path):
    q = await setup_viewer(r, "t1")
    sub = r.pubsub()
    await sub.subscribe("letta_responses")
    await sub.get_message(timeout=1)
    result = await q.finish(V, "A", [done("t1")], done_ttl=60, peek=1, outputs=[
        Output("publish", "letta_responses", "reply"),
        Output("lpush", "tts_requests", b"speech"),
        Output("dead_letter", keys.BRIDGE_DEAD_LETTERS, "dead"),
    ])
    assert (result.status, result.released, result.queued) == (1, True, [])
    assert await queue_of(r) == []
    assert await r.get(keys.task_done("t1")) == b"1" and 0 < await r.ttl(keys.task_done("t1")) <= 60
    assert await r.smembers(keys.viewer_tasks(V)) == {b"t1"}
    assert await r.hget(keys.BRIDGE_ATTEMPTS, "t1") is None and await r.hget(keys.BRIDGE_COUNTED, "t1") is None
    assert await r.exists(keys.viewer_active(V)) == 0 and await pending(r) == set()
    assert await r.lrange("tts_requests", 0, -1) == [b"speech"]
    assert await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1) == [b"dead"]
    message = await sub.get_message(ignore_subscribe_messages=True, timeout=1)
    assert message and message["data"] == b"reply"
    await sub.aclose()


@scenario
async def test_finish_with_more_queued_keeps_the_lock_and_returns_the_next_heads(r, url, tmp_path):
    q = await setup_viewer(r, "t1", "t2", "t3", "t4")
    result = await q.finish(V, "A", [done("t1"), done("t2")], done_ttl=60, outputs=[], peek=5)  # coalesced: 2
    assert (result.status, result.released, result.queued) == (1, False, [raw("t3"), raw("t4")])
    assert await queue_of(r) == [raw("t3"), raw("t4")]
    assert await r.get(keys.viewer_active(V)) == b"A" and await pending(r) == {V}


@scenario
async def test_finish_without_task_id_or_done_marker_leaves_no_marker(r, url, tmp_path):
    q = await setup_viewer(r, "t1", "t2")
    tasks = [Finished(raw=raw("t1"), task_id=None, done_value=None), Finished(raw=raw("t2"), task_id="t2", done_value=None)]
    result = await q.finish(V, "A", tasks, done_ttl=60, outputs=[], peek=1)
    assert result.status == 1 and await queue_of(r) == []
    assert await r.keys(keys.TASK_DONE_PREFIX + "*") == [] and await r.exists(keys.viewer_tasks(V)) == 0
    assert await r.hget(keys.BRIDGE_ATTEMPTS, "t2") is None  # acknowledged all the same


@scenario
async def test_finish_caps_the_dead_letter_list(r, url, tmp_path):
    q = queues(r, dead_letter_max=2)
    for task_id in ("t1", "t2", "t3"):
        await r.rpush(keys.viewer_queue(V), raw(task_id))
    await q.claim(V, "A", 5000, peek=1)
    for task_id in ("t1", "t2", "t3"):
        await q.finish(V, "A", [done(task_id)], done_ttl=60, peek=1,
                       outputs=[Output("dead_letter", keys.BRIDGE_DEAD_LETTERS, task_id)])
    assert await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1) == [b"t3", b"t2"]  # newest first, capped


REFUSED_FINISHES = [
    # (what went wrong, token, tasks) → status; nothing is written in any of them
    ("stale token", "B", [done("t1")], FinishStatus.LOCK_LOST),
    ("head moved", "A", [done("t2")], FinishStatus.HEAD_MOVED),
    ("fewer queued than answered", "A", [done("t1"), done("t2"), done("t3")], FinishStatus.HEAD_MOVED),
    ("second of a group moved", "A", [done("t1"), done("t9")], FinishStatus.HEAD_MOVED),
]


@pytest.mark.parametrize("what, token, tasks, status", REFUSED_FINISHES, ids=[c[0] for c in REFUSED_FINISHES])
def test_finish_refuses_and_changes_nothing(redis_url, tmp_path, what, token, tasks, status):
    @scenario
    async def body(r, url, tmp):
        q = await setup_viewer(r, "t1", "t2")
        result = await q.finish(V, token, tasks, done_ttl=60, peek=1,
                                outputs=[Output("lpush", "tts_requests", "speech")])
        assert (result.status, result.released, result.queued) == (status, False, [])
        assert await queue_of(r) == [raw("t1"), raw("t2")]
        assert await r.llen("tts_requests") == 0 and await r.keys(keys.TASK_DONE_PREFIX + "*") == []
        assert await r.hget(keys.BRIDGE_ATTEMPTS, "t1") == b"1"
        assert await r.get(keys.viewer_active(V)) == b"A"

    body(redis_url, tmp_path)


@scenario
async def test_finish_with_an_unknown_output_op_fails_before_writing_anything(r, url, tmp_path):
    q = await setup_viewer(r, "t1")
    with pytest.raises(ResponseError, match="unknown output op"):
        await q.finish(V, "A", [done("t1")], done_ttl=60, peek=1, outputs=[
            Output("lpush", "tts_requests", "speech"), Output("rpush", "elsewhere", "x"),  # type: ignore[arg-type]
        ])
    assert await queue_of(r) == [raw("t1")] and await r.llen("tts_requests") == 0


# ---- RELEASE ----

RELEASES = [
    # (queued tasks, token, yield?) → (status, lock kept?, on the ready list?, still pending?)
    ([], "A", False, (ReleaseStatus.RELEASED, False, False, False)),
    ([], "A", True, (ReleaseStatus.RELEASED, False, False, False)),
    (["t1"], "A", False, (ReleaseStatus.KEEP_WORKING, True, False, True)),  # more work: keep going
    (["t1"], "A", True, (ReleaseStatus.YIELDED, False, True, True)),  # yield to others: back on the ready list
    (["t1"], "B", True, (ReleaseStatus.LOCK_LOST, True, False, True)),  # not ours: nothing changes
    ([], "B", False, (ReleaseStatus.LOCK_LOST, True, False, True)),
]


@pytest.mark.parametrize("queued, token, yield_turn, expected", RELEASES)
def test_release_table(redis_url, tmp_path, queued, token, yield_turn, expected):
    @scenario
    async def body(r, url, tmp):
        q = await setup_viewer(r, *queued)
        status = await q.release(V, token, yield_turn=yield_turn)
        assert (status, bool(await r.exists(keys.viewer_active(V))), V in await ready(r), V in await pending(r)) == expected

    body(redis_url, tmp_path)


@scenario
async def test_release_yield_does_not_ready_a_viewer_twice(r, url, tmp_path):
    q = await setup_viewer(r, "t1")
    await r.rpush(keys.BRIDGE_READY, V)
    assert await q.release(V, "A", yield_turn=True) == 2
    assert await ready(r) == [V]


# ---- SWEEP (and the crash points between CLAIM and FINISH) ----

@scenario
async def test_a_dead_worker_is_swept_its_viewer_handed_on_and_its_stale_finish_refused(r, url, tmp_path):
    q = queues(r)
    await route_one(r, raw("t1"))
    assert await q.next_ready(timeout=0.1) == V
    assert await q.claim(V, "dead", 50, peek=1) == [raw("t1")]  # the worker dies here, mid-turn
    assert await q.sweep() == 0  # its lock is still live: nobody else may start the turn
    await asyncio.sleep(0.1)  # the lock expires (VTL_BRIDGE_LOCK_TTL)
    assert await queue_of(r) == [raw("t1")]  # the task never left its queue
    assert await q.sweep() == 1 and await q.next_ready(timeout=0.1) == V
    assert await q.claim(V, "live", 5000, peek=1) == [raw("t1")]  # a live worker takes it over

    # the dead worker comes back (a long GC pause, a slow Letta call): every step is refused
    assert await q.renew(V, "dead", 5000) is False
    stale = await q.finish(V, "dead", [done("t1")], done_ttl=60, outputs=[Output("publish", "x", "y")], peek=1)
    assert stale.status == 0
    assert await q.release(V, "dead", yield_turn=True) == -1
    assert await queue_of(r) == [raw("t1")] and await r.get(keys.viewer_active(V)) == b"live"

    answered = await q.finish(V, "live", [done("t1")], done_ttl=60, outputs=[], peek=1)
    assert (answered.status, answered.released) == (1, True)
    assert await q.is_done("t1") and await q.done_flags(["t1", "t2"]) == [True, False]


@scenario
async def test_a_worker_dead_after_finish_but_before_release_leaves_its_viewer_sweepable(r, url, tmp_path):
    q = await setup_viewer(r, "t1", "t2")
    await q.finish(V, "A", [done("t1")], done_ttl=60, outputs=[], peek=1)  # t2 left; the worker dies
    await r.delete(keys.viewer_active(V))  # its lock expires
    assert await q.sweep() == 1 and await ready(r) == [V] and await queue_of(r) == [raw("t2")]


@scenario
async def test_a_task_routed_while_the_worker_releases_is_never_stranded(r, url, tmp_path):
    q = await setup_viewer(r, "t1")
    await route_one(r, raw("t2"))  # routed while the viewer is held: not readied
    assert await ready(r) == []
    result = await q.finish(V, "A", [done("t1")], done_ttl=60, outputs=[], peek=1)
    assert (result.released, result.queued) == (False, [raw("t2")])  # the worker sees it and keeps going
    assert await q.release(V, "A", yield_turn=False) == 0


# ---- dead-lettering triage, counting viewer stats ----

@scenario
async def test_dead_letter_triage_moves_only_the_expected_oldest_payload(r, url, tmp_path):
    q = queues(r, dead_letter_max=2)
    await r.lpush(keys.BRIDGE_TRIAGE, b"bad-1", b"bad-2", b"bad-3")
    assert await q.oldest_triage() == b"bad-1"
    assert await q.dead_letter_triage(b"bad-2", "entry") is False  # another replica took bad-1 meanwhile
    for entry, payload in (("e1", b"bad-1"), ("e2", b"bad-2"), ("e3", b"bad-3")):
        assert await q.dead_letter_triage(payload, entry) is True
    assert await r.llen(keys.BRIDGE_TRIAGE) == 0
    assert await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1) == [b"e3", b"e2"]
    assert await q.oldest_triage() is None


@scenario
async def test_begin_attempt_counts_attempts_every_time_and_stats_once_per_task(r, url, tmp_path):
    q = queues(r)
    ops = [("setnx", "first_seen", "1.0"), ("set", "last_seen", "2.0"), ("incr", "gifts", "3"), ("incrf", "yuan", "1.5")]
    assert await q.begin_attempt(V, [("t1", ops)]) == (
        [1], {"first_seen": "1.0", "last_seen": "2.0", "gifts": "3", "yuan": "1.5"})
    attempts, stats = await q.begin_attempt(V, [("t1", ops)])  # a retry of the same task
    assert attempts == [2] and stats["gifts"] == "3" and stats["yuan"] == "1.5"
    later = [("setnx", "first_seen", "9.0"), ("set", "last_seen", "9.0"), ("incr", "gifts", "1"), ("incrf", "yuan", "0.25")]
    attempts, stats = await q.begin_attempt(V, [("t2", later), ("t3", [])])
    assert attempts == [1, 1]
    assert stats == {"first_seen": "1.0", "last_seen": "9.0", "gifts": "4", "yuan": "1.75"}


# ---- ViewerHold: the commands' hold on a viewer (CLAIM, RELEASE, DROP_VIEWER) ----

def test_viewer_hold_claims_releases_and_drops(redis_url):
    r = redis_sync.Redis.from_url(redis_url)
    try:
        hold = ViewerHold(r, ttl_ms=5000)
        r.set(keys.viewer_active("busy"), "worker")
        assert hold.claim("busy") is None  # a turn in flight: never waited for

        token = hold.claim(V)
        assert token and token.startswith("hold-") and r.get(keys.viewer_active(V)) == token.encode()
        r.rpush(keys.viewer_queue(V), raw("t1"))  # routed while held
        r.sadd(keys.BRIDGE_PENDING, V)
        hold.release(V, token)
        assert r.exists(keys.viewer_active(V)) == 0 and r.lrange(keys.BRIDGE_READY, 0, -1) == [V.encode()]

        r.delete(keys.BRIDGE_READY)
        token = hold.claim(V)
        r.rpush(keys.BRIDGE_READY, V)
        assert hold.drop_and_release(V, "hold-stale") == -1 and r.llen(keys.viewer_queue(V)) == 1
        assert hold.drop_and_release(V, token) == 1
        assert r.exists(keys.viewer_queue(V), keys.viewer_active(V), keys.BRIDGE_READY) == 0
        assert r.sismember(keys.BRIDGE_PENDING, V) == 0
    finally:
        r.close()
