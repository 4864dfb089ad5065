"""bridge/errors.py beyond the classification tables of test_bridge_letta.py: the stop reasons
beside the statuses, and the one error type carrying its cause."""

from __future__ import annotations

import httpx
import letta_client
import pytest

from bridge.errors import Disposition, LettaError, LettaPermanentError, LettaRetryable, LettaUnavailable, classify_error, classify_stop_reason, letta_error

REQ = httpx.Request("POST", "http://letta.test/v1/agents/agent-1/messages")


@pytest.mark.parametrize("stop, expected", [
    ("llm_api_error", Disposition.UNAVAILABLE),
    ("insufficient_credits", Disposition.UNAVAILABLE),
    ("error", Disposition.RETRY),
    ("invalid_llm_response", Disposition.RETRY),
    ("invalid_tool_call", Disposition.RETRY),
    ("cancelled", Disposition.RETRY),
    ("requires_approval", Disposition.GIVE_UP),
    ("context_window_overflow_in_system_prompt", Disposition.GIVE_UP),
    ("end_turn", None),  # not failures: the reply is whatever the run produced
    ("max_steps", None),
    ("no_tool_call", None),
    (None, None),
    ("a reason this version does not know", None),
])
def test_classify_stop_reason(stop, expected):
    assert classify_stop_reason(stop) is expected


@pytest.mark.parametrize("disposition, cls", [
    (Disposition.UNAVAILABLE, LettaUnavailable), (Disposition.RETRY, LettaRetryable), (Disposition.GIVE_UP, LettaPermanentError),
])
def test_one_error_type_its_disposition_by_name(disposition, cls):
    error = LettaError.of(disposition, "turn stopped: x")
    assert type(error) is cls and isinstance(error, LettaError)
    assert error.disposition is disposition and classify_error(error) is disposition
    assert str(error) == "turn stopped: x" and error.status is None and error.agent_gone is False


def _status(cls, status: int) -> letta_client.APIStatusError:
    return cls(f"HTTP {status}", response=httpx.Response(status, request=REQ, json={"detail": "x"}), body=None)


@pytest.mark.parametrize("raw, disposition, status, agent_gone", [
    (_status(letta_client.NotFoundError, 404), Disposition.GIVE_UP, 404, True),
    (_status(letta_client.RateLimitError, 429), Disposition.RETRY, 429, False),
    (_status(letta_client.InternalServerError, 503), Disposition.UNAVAILABLE, 503, False),
    (letta_client.APIConnectionError(request=REQ), Disposition.UNAVAILABLE, None, False),
    (ValueError("a bug"), Disposition.GIVE_UP, None, False),
])
def test_letta_error_carries_the_cause_of_an_sdk_error(raw, disposition, status, agent_gone):
    error = letta_error(raw)
    assert (error.disposition, error.status, error.agent_gone) == (disposition, status, agent_gone)
    assert type(raw).__name__ in str(error)


def test_letta_error_keeps_our_own_error_as_it_is():
    ours = LettaRetryable("busy", status=409)
    assert letta_error(ours) is ours
