"""bridge/queue.py's scripts on their own, against a real redis-server (conftest.py)."""

from __future__ import annotations

from bridge_harness import scenario

from bridge.queue import ViewerQueues
from vtuber_letta import redis_keys as keys


def queues(r) -> ViewerQueues:
    return ViewerQueues(r, request_queue="letta_requests", max_payload_bytes=65536, dead_letter_max=100)


@scenario
async def test_sweep_readies_orphans_forgets_empty_queues_and_leaves_held_viewers_alone(r, url, tmp_path):
    orphans = [f"bilibili:orphan-{i}" for i in range(7)]  # work waiting, nobody holds them
    for viewer in orphans:
        await r.rpush(keys.viewer_queue(viewer), b"{}")
    await r.rpush(keys.viewer_queue("bilibili:held"), b"{}")
    await r.set(keys.viewer_active("bilibili:held"), "token")
    await r.rpush(keys.viewer_queue("bilibili:queued"), b"{}")
    await r.rpush(keys.BRIDGE_READY, "bilibili:queued")  # already on the ready list: not twice
    await r.sadd(keys.BRIDGE_PENDING, *orphans, "bilibili:held", "bilibili:queued", "bilibili:empty")

    assert await queues(r).sweep(batch=3) == 7  # several batches, each one script call
    ready = [v.decode() for v in await r.lrange(keys.BRIDGE_READY, 0, -1)]
    assert sorted(ready) == sorted(["bilibili:queued", *orphans])
    pending = {v.decode() for v in await r.smembers(keys.BRIDGE_PENDING)}
    assert pending == {*orphans, "bilibili:held", "bilibili:queued"}  # the empty one is forgotten
    assert await queues(r).sweep() == 0  # nothing more to do: orphans are on the ready list now
