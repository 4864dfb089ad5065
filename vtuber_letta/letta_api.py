"""The one place that builds Letta SDK clients.

Message sends must use `for_messages=True`: the SDK retries 408/409/429/5xx and
timeouts by itself, which can deliver one viewer message twice, so for sends the
SDK's retries are off and the caller owns the retry policy. Other calls are
idempotent reads/upserts and keep LETTA_RETRY_ATTEMPTS.
"""

from __future__ import annotations

from letta_client import AsyncLetta, Letta

from vtuber_letta.settings import Settings


def letta_client(settings: Settings, *, for_messages: bool = False) -> Letta:
    return Letta(
        base_url=settings.letta_api_url,
        api_key=settings.letta_password,
        timeout=settings.letta_timeout,
        max_retries=0 if for_messages else settings.letta_retry_attempts,
    )


def async_letta_client(settings: Settings, *, for_messages: bool = False) -> AsyncLetta:
    return AsyncLetta(
        base_url=settings.letta_api_url,
        api_key=settings.letta_password,
        timeout=settings.letta_timeout,
        max_retries=0 if for_messages else settings.letta_retry_attempts,
    )
