"""The one place that builds Letta SDK clients.

Message sends must use `for_messages=True`: the SDK retries 408/409/429/5xx and
timeouts by itself, which can deliver one viewer message twice, so for sends the
SDK's retries are off and the caller owns the retry policy. Other calls are
idempotent reads/upserts and keep LETTA_RETRY_ATTEMPTS.

`connections`: how many requests the caller keeps in flight at once. The SDK's pool
keeps only 20 idle connections; the bridge streams up to VTL_BRIDGE_CONCURRENCY turns
and then reads each response to its end in the background, so under load (measured:
32 viewers) every turn opened a new TCP connection to Letta. A pool that keeps
`connections` idle ones reuses them.
"""

from __future__ import annotations

import httpx
from letta_client import AsyncLetta, DefaultAsyncHttpxClient, Letta

from vtuber_letta.settings import Settings

KEEPALIVE_S = 4.0  # below Letta's uvicorn keep-alive (5 s): never reuse a connection the server is closing


def letta_client(settings: Settings, *, for_messages: bool = False) -> Letta:
    return Letta(
        base_url=settings.letta_api_url,
        api_key=settings.letta_password,
        timeout=settings.letta_timeout,
        max_retries=0 if for_messages else settings.letta_retry_attempts,
    )


def async_letta_client(settings: Settings, *, for_messages: bool = False, connections: int | None = None) -> AsyncLetta:
    http_client = None
    if connections is not None:
        limits = httpx.Limits(max_connections=max(100, connections), max_keepalive_connections=connections,
                              keepalive_expiry=KEEPALIVE_S)
        http_client = DefaultAsyncHttpxClient(limits=limits, timeout=settings.letta_timeout)
    return AsyncLetta(
        base_url=settings.letta_api_url,
        api_key=settings.letta_password,
        timeout=settings.letta_timeout,
        max_retries=0 if for_messages else settings.letta_retry_attempts,
        http_client=http_client,
    )
