"""Shared harness of the bridge's unit tests: a real redis-server (conftest.py), the bridge run
in-process with fake_gateway.FakeGateway, and a recorder of everything it publishes."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fake_gateway import FakeGateway
from redis.asyncio import Redis

from bridge import check_bridge, run_bridge
from vtuber_letta import redis_keys as keys
from vtuber_letta.settings import Settings

OUTPUT_PATTERNS = ("letta_responses", "letta_response_chunks", "task_response:*", "live2d_events", "avatar_out")


def make_settings(redis_url: str, tmp_path: Path, **overrides) -> Settings:
    values = {
        "REDIS_URL": redis_url,
        "VTL_DATA_DIR": tmp_path,
        "VTL_BRIDGE_METRICS_PORT": 0,
        "VTL_BRIDGE_POLL_TIMEOUT": 0.05,
        "VTL_BRIDGE_SWEEP_INTERVAL": 0.1,
        "VTL_BRIDGE_HEARTBEAT_INTERVAL": 0.1,
        "VTL_BRIDGE_HEARTBEAT_TTL": 0.6,
        "VTL_BRIDGE_LOCK_TTL": 0.6,
        "VTL_BRIDGE_RETRY_BASE_DELAY": 0.01,
        "VTL_BRIDGE_RETRY_MAX_DELAY": 0.04,
        "VTL_BRIDGE_LETTA_DOWN_HOLD": 0.2,
        "VTL_BRIDGE_GRACE_PERIOD": 5,
        "VTL_BRIDGE_CONCURRENCY": 4,
        "VTL_BRIDGE_TURNS_PER_CLAIM": 3,
        "LETTA_RETRY_ATTEMPTS": 2,
        # One turn per message: most tests follow single tasks; coalescing has tests of its own.
        "VTL_BRIDGE_COALESCE_MAX": 1,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def task(task_id: str, user_id: str = "bilibili:1", content: str | None = "hi", **fields) -> dict:
    body = {"task_id": task_id, "type": "text", "user_id": user_id, "source": "user", "timestamp": 1.0,
            "meta": {"memory_type": "permanent", "lang": "zh", "trace_id": None, "display_name": "小明"}}
    if content is not None:
        body["content"] = content
    body.update(fields)
    return body


class Outputs:
    """Records everything published on the bridge's output channels, from before the first task."""

    def __init__(self, url: str):
        self.url = url
        self.messages: list[tuple[str, dict]] = []

    async def __aenter__(self) -> "Outputs":
        self.client = Redis.from_url(self.url)
        self.pubsub = self.client.pubsub()
        await self.pubsub.psubscribe(*OUTPUT_PATTERNS)
        for _ in OUTPUT_PATTERNS:
            await self.pubsub.get_message(timeout=1)  # the subscribe confirmations
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message and message["type"] == "pmessage":
                self.messages.append((message["channel"].decode(), json.loads(message["data"])))

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.pubsub.aclose()
        await self.client.aclose()

    def on(self, channel: str) -> list[dict]:
        return [data for name, data in self.messages if name == channel]

    def responses(self) -> list[dict]:
        return self.on("letta_responses")


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@asynccontextmanager
async def running(settings: Settings, gateway: FakeGateway, replica_id: str = "r1"):
    stop = asyncio.Event()
    runner = asyncio.create_task(run_bridge(settings, gateway, stop_event=stop, replica_id=replica_id))
    await wait_for(lambda: check_bridge(settings, replica_id) if not runner.done() else runner.result(), what="heartbeat")
    try:
        yield runner
    finally:
        stop.set()
        if not runner.done():
            await asyncio.wait_for(runner, timeout=10)


async def push(r: Redis, *tasks, queue: str = "letta_requests") -> None:
    for item in tasks:
        await r.lpush(queue, item if isinstance(item, (bytes, str)) else json.dumps(item, ensure_ascii=False))


async def llen_is(r: Redis, key: str, n: int) -> bool:
    return await r.llen(key) == n


async def dead_letters(r: Redis) -> list[dict]:
    return [json.loads(x) for x in await r.lrange(keys.BRIDGE_DEAD_LETTERS, 0, -1)]


def scenario(coro_fn):
    """Run an async test body with a fresh Redis client."""

    def runner(redis_url, tmp_path):
        async def main():
            r = Redis.from_url(redis_url)
            try:
                await coro_fn(r, redis_url, tmp_path)
            finally:
                await r.aclose()

        asyncio.run(main())

    runner.__name__ = coro_fn.__name__
    return runner



async def _not(awaitable) -> bool:
    return not await awaitable
