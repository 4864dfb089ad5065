"""The one place that builds Redis clients (sync for the CLI and provisioning, asyncio for the bridge)."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from vtuber_letta.settings import Settings


def redis_client(settings: Settings, *, decode_responses: bool = True) -> redis.Redis:
    """Sync client; decode_responses=False for reading the bridge's lists (payloads may not be UTF-8)."""
    return redis.Redis.from_url(settings.redis_connection_url, decode_responses=decode_responses, socket_timeout=30)


def async_redis_client(settings: Settings, *, decode_responses: bool = True, **options) -> aioredis.Redis:
    """asyncio client; the bridge passes decode_responses=False to keep payloads byte for byte."""
    return aioredis.Redis.from_url(settings.redis_connection_url, decode_responses=decode_responses, **options)


def bytes_client(client: redis.Redis) -> redis.Redis:
    """A client of the same server as `client` that keeps values as bytes (bridge payloads may not be UTF-8)."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
