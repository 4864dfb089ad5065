"""What the bridge does with a failed Letta call, decided in one place.

A gateway raises one error type, `LettaError`, which carries its cause: the `disposition` (retry
it, wait for Letta, give up), the HTTP status when there was one, and whether the viewer's agent
is gone (a 404 on the agent). The three subclasses are the three dispositions by name.
Everything that can fail a Letta call is classified here, side by side: HTTP statuses
(`classify_status`), the stop reasons a run can end with (`classify_stop_reason`) and any other
exception (`classify_error`, raw SDK and transport errors included, so a gateway that lets one
escape is still handled sensibly). Pure and table-tested (tests/unit/test_bridge_errors.py), in
the manner of lettabot's error classifier.
"""

from __future__ import annotations

from enum import Enum

import httpx
import letta_client
from redis.exceptions import RedisError


class Disposition(str, Enum):
    RETRY = "retry"  # transient refusal by a live server: a few more attempts, then give up
    UNAVAILABLE = "unavailable"  # Letta unusable right now: fallback, or wait for recovery
    GIVE_UP = "give_up"  # the task itself is the problem: dead-letter it


class LettaError(Exception):
    """A Letta call failed. `disposition`: what to do about it; `status`: the HTTP status, if any;
    `agent_gone`: Letta answered 404 for the agent (forgotten: re-resolve it, never dead-letter)."""

    disposition: Disposition = Disposition.GIVE_UP

    def __init__(self, message: str = "", *, status: int | None = None, agent_gone: bool = False):
        super().__init__(message)
        self.status = status
        self.agent_gone = agent_gone

    @staticmethod
    def of(disposition: Disposition, message: str, **cause) -> "LettaError":
        """The error of that disposition (its subclass below)."""
        return _BY_DISPOSITION[disposition](message, **cause)


class LettaUnavailable(LettaError):
    """Letta (or the model behind it) is unreachable or overloaded: transient."""

    disposition = Disposition.UNAVAILABLE


class LettaRetryable(LettaError):
    """A live server refused this once (rate limit, conflict, internal error): try again later."""

    disposition = Disposition.RETRY


class LettaPermanentError(LettaError):
    """Letta rejected the request itself; sending it again cannot help."""

    disposition = Disposition.GIVE_UP


_BY_DISPOSITION = {cls.disposition: cls for cls in (LettaUnavailable, LettaRetryable, LettaPermanentError)}

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

# How a run that produced nothing can stop (letta_client's StopReasonType), beside the statuses.
_UNAVAILABLE_STOPS = frozenset({"llm_api_error", "insufficient_credits"})
_RETRY_STOPS = frozenset({"error", "invalid_llm_response", "invalid_tool_call", "cancelled"})
_PERMANENT_STOPS = frozenset({"requires_approval", "context_window_overflow_in_system_prompt"})


def classify_status(status: int) -> Disposition:
    """Disposition of an HTTP status from Letta."""
    if status in _UNAVAILABLE_STATUS:
        return Disposition.UNAVAILABLE
    if status in _RETRY_STATUS or status >= 500:
        return Disposition.RETRY
    return Disposition.GIVE_UP


def classify_stop_reason(stop: str | None) -> Disposition | None:
    """Disposition of a run that stopped without producing anything; None: not a failure
    (end_turn, max_steps... or a reason this version does not know)."""
    if stop in _UNAVAILABLE_STOPS:
        return Disposition.UNAVAILABLE
    if stop in _RETRY_STOPS:
        return Disposition.RETRY
    if stop in _PERMANENT_STOPS:
        return Disposition.GIVE_UP
    return None


def classify_error(exc: BaseException) -> Disposition:
    """Disposition of any exception raised while handling a task with Letta."""
    if isinstance(exc, LettaError):
        return exc.disposition
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
    return Disposition.GIVE_UP  # a response we cannot read (APIResponseValidationError) or a bug


def letta_error(exc: BaseException) -> LettaError:
    """Our error for anything raised by the SDK or the transport (a LettaError as it is)."""
    if isinstance(exc, LettaError):
        return exc
    status = getattr(exc, "status_code", None)
    return LettaError.of(classify_error(exc), describe_error(exc), status=status,
                         agent_gone=isinstance(exc, letta_client.NotFoundError))


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
