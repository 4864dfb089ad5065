"""The one decision about a failed Letta call: retry it, wait for Letta, or give up.

Pure and table-tested (tests/unit/test_bridge_errors.py), in the manner of lettabot's
error classifier. Both our gateway exceptions and raw SDK/HTTP errors are accepted,
so a gateway that lets an SDK error escape is still handled sensibly.
"""

from __future__ import annotations

from enum import Enum

import httpx
import letta_client
from redis.exceptions import RedisError

from bridge.gateway import LettaPermanentError, LettaRetryable, LettaUnavailable


class Disposition(str, Enum):
    RETRY = "retry"  # transient refusal by a live server: a few more attempts, then give up
    UNAVAILABLE = "unavailable"  # Letta unusable right now: fallback, or wait for recovery
    GIVE_UP = "give_up"  # the task itself is the problem: dead-letter it


# 401/403 mean this bridge cannot use Letta at all (wrong LETTA_API_KEY): treated as an outage,
# so the show goes on through the fallback instead of dead-lettering every viewer's message.
_UNAVAILABLE_STATUS = frozenset({401, 403, 502, 503, 504})
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500})
# Letta 0.16.8 names a model provider's failure in the error body, {"error": {"type": ...}}
# (letta/server/rest_api/app.py): the model endpoint down or failing (`llm_error`, a 500),
# rate-limited (429), timing out (504), out of credits (402) or refusing the key (401). None is
# about the task: Letta cannot answer now — wait for it or fall back, never dead-letter.
# `llm_bad_request` (400) stays a refusal of this request.
MODEL_UNAVAILABLE_TYPES = frozenset({
    "llm_error", "llm_rate_limit", "llm_timeout", "llm_insufficient_credits", "llm_authentication",
})


def classify_status(status: int) -> Disposition:
    """Disposition of an HTTP status from Letta."""
    if status in _UNAVAILABLE_STATUS:
        return Disposition.UNAVAILABLE
    if status in _RETRY_STATUS or status >= 500:
        return Disposition.RETRY
    return Disposition.GIVE_UP


def classify_error(exc: BaseException) -> Disposition:
    """Disposition of any exception raised while handling a task with Letta."""
    if isinstance(exc, LettaUnavailable):
        return Disposition.UNAVAILABLE
    if isinstance(exc, LettaRetryable):
        return Disposition.RETRY
    if isinstance(exc, LettaPermanentError):
        return Disposition.GIVE_UP
    if isinstance(exc, letta_client.APIStatusError):
        if letta_error_type(exc) in MODEL_UNAVAILABLE_TYPES:
            return Disposition.UNAVAILABLE
        return classify_status(exc.status_code)
    if isinstance(exc, httpx.HTTPStatusError):
        return classify_status(exc.response.status_code)
    if isinstance(exc, (letta_client.APIConnectionError, httpx.TransportError, TimeoutError, ConnectionError)):
        return Disposition.UNAVAILABLE
    if isinstance(exc, RedisError):  # e.g. the viewer's creation lock while finding its agent: not the task
        return Disposition.UNAVAILABLE
    if isinstance(exc, letta_client.APIResponseValidationError):
        return Disposition.GIVE_UP
    return Disposition.GIVE_UP


def letta_error_type(exc: BaseException) -> str | None:
    """The `error.type` of a Letta error body (e.g. "llm_rate_limit"), if it has one."""
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) else None


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """A one-line, length-capped description for logs and dead letters (never a request body)."""
    status = getattr(exc, "status_code", None)
    head = f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "")
    text = " ".join(str(exc).split())
    text = text[:limit] + ("…" if len(text) > limit else "")
    return f"{head}: {text}" if text else head
