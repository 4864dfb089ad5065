"""The console's recent task outcomes (bridge/outcome_log.py): written by the bridge after each
outcome, capped, never in a turn's way, holding no text; removed by `agent forget`. And the display
name the bridge keeps for the console's search (bridge/viewer_stats.py NAME_FIELD)."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest
import redis
from bridge_harness import Outputs, llen_is, make_settings, push, running, scenario, task, wait_for
from fake_gateway import FakeGateway
from redis.asyncio import Redis

from bridge import outcome_log
from bridge.metrics import BridgeMetrics
from bridge.outcome_log import KEPT, OutcomeLog, TaskOutcome
from bridge.viewer_stats import NAME_FIELD, name_key, searchable_name
from provisioning.forget import ForgetReport, Forgetter
from vtuber_letta import redis_keys as keys

pytestmark = pytest.mark.timeout(60)


async def entries(r: Redis) -> list[dict]:
    return [json.loads(x) for x in await r.lrange(keys.BRIDGE_OUTCOMES, 0, -1)]


@scenario
async def test_the_bridge_lists_each_outcome_with_ids_and_seconds_and_no_text(r, url, tmp_path):
    settings = make_settings(url, tmp_path)
    temporary = task("t-temp", user_id="bilibili:2", content="forward me",
                     meta={"memory_type": "temporary", "trace_id": None})
    async with Outputs(url) as out, running(settings, FakeGateway()):
        await push(r, task("t-1", content="secret words 你好"), temporary, "[1, 2, 3]",
                   task("t-bad", type="sticker"))
        await wait_for(out.responses, what="the answer")
        await wait_for(lambda: llen_is(r, keys.BRIDGE_OUTCOMES, 4), what="four outcomes")
    listed = await entries(r)
    by_task = {e.get("task_id"): e for e in listed}
    assert by_task["t-1"]["outcome"] == "answered" and by_task["t-1"]["user_id"] == "bilibili:1"
    assert by_task["t-temp"]["outcome"] == "forwarded" and by_task["t-bad"]["outcome"] == "dead_letter"
    assert by_task[None] == {**by_task[None], "outcome": "dead_letter", "seconds": 0.0}  # unroutable: no ids
    assert "user_id" not in by_task[None]
    for entry in listed:
        TaskOutcome.model_validate(entry)
        assert entry["replica_id"] == "r1" and entry["at"] > 1e9 and 0 <= entry["seconds"] < 10
    text = json.dumps(listed, ensure_ascii=False)
    assert "secret words" not in text and "echo" not in text and "forward me" not in text  # ids only
    # the name the console searches, kept beside the viewer's counters
    assert (await r.hget(keys.viewer_stats("bilibili:1"), NAME_FIELD)).decode() == searchable_name("小明")


def _replica(client, clock=lambda: 1_767_000_000.0):
    return SimpleNamespace(clock=clock, replica_id="r-test", queues=SimpleNamespace(redis=client),
                           outcome_log=OutcomeLog(), metrics=BridgeMetrics())


@scenario
async def test_the_list_is_capped_newest_first(r, url, tmp_path):
    replica = _replica(r)
    for n in range(KEPT + 5):
        outcome_log.record(replica, "bilibili:1", f"t-{n}", "answered", 0.5)
    await replica.outcome_log.drain()
    assert await r.llen(keys.BRIDGE_OUTCOMES) == KEPT
    newest = await outcome_log.recent(r, 3)
    assert {o.task_id for o in newest} <= {f"t-{n}" for n in range(KEPT + 5 - 10, KEPT + 5)}
    assert f"t-{KEPT + 4}" in {o.task_id for o in await outcome_log.recent(r, 10)}
    await r.lpush(keys.BRIDGE_OUTCOMES, "not an outcome")
    assert len(await outcome_log.recent(r, 4)) == 3  # a foreign entry is skipped, not an error


def test_a_redis_error_is_logged_and_never_raised(caplog):
    async def main():
        down = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens there
        replica = _replica(down)
        with caplog.at_level(logging.WARNING, logger="vtuber_letta.bridge"):
            outcome_log.record(replica, "bilibili:1", "t-1", "answered", 0.1)  # returns at once
            outcome_log.record(SimpleNamespace(), "bilibili:1", "t-2", "answered", 0.1)  # not even a replica
            await replica.outcome_log.drain(timeout=5)
        await down.aclose()

    asyncio.run(main())
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("task outcome(s) not recorded" in m and "ConnectionError" in m for m in messages), messages
    assert any("outcome of task t-2 not recorded" in m for m in messages), messages


def test_forget_removes_the_viewers_entries_and_keeps_the_others(redis_url, tmp_path):
    settings = make_settings(redis_url, tmp_path)
    r = redis.Redis.from_url(redis_url)
    try:
        mine = [TaskOutcome(at=1.0, outcome="answered", seconds=1.0, task_id=f"t-{n}", user_id="bilibili:1",
                            replica_id="r1").model_dump_json() for n in range(3)]
        other = TaskOutcome(at=1.0, outcome="answered", seconds=1.0, task_id="t-x", user_id="bilibili:10",
                            replica_id="r1").model_dump_json()
        r.lpush(keys.BRIDGE_OUTCOMES, mine[0], other, mine[1], mine[2])
        report = ForgetReport("bilibili:1")
        Forgetter(settings, None, r, creation_lock_ttl=5, lock_wait=1)._clean_redis("bilibili:1", report)
        assert r.lrange(keys.BRIDGE_OUTCOMES, 0, -1) == [other.encode()]
        assert report.removed["outcomes"] == 3 and "3 recent outcomes" in report.render()
    finally:
        r.close()


@pytest.mark.parametrize(("name", "search", "found"), [
    ("Alice Wonder", "WONDER", True),
    ("A\u200blice", "alice", True),  # a zero-width space does not hide a name
    ("\u202eecilA", "ecila", True),  # nor a bidi control
    ("Ｚｏë", "zoë", True),  # full-width letters, as NFKC reads them
    ("call 13812345678", "13812345678", False),  # a phone number is not kept, even for searching
    ("Bob", "alice", False),
])
def test_name_key_makes_names_and_searches_comparable(name, search, found):
    assert (name_key(search) in searchable_name(name)) is found
