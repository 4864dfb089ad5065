"""The one module that talks to Letta's message API (letta-client 1.12.1, Letta server 0.16.8).

`LettaTurns` is the message half of the real `LettaGateway`: `send_turn` and `find_answered`.

Idempotency: every user message carries an `otid` (Letta's "offline threading id",
`MessageCreate.otid`) derived from the task id. The server stores it on the user message
(`letta/helpers/message_helper.py` copies `message_create.otid`) and returns it from
`GET /v1/agents/{id}/messages` (`UserMessage.otid`), and every message of one request shares
a `run_id`. So after a crash the bridge can find "was task X already answered?" without a
second turn: look for the user message with X's otid, and read the messages of its run.

The SDK's own retries are off (`max_retries=0`): it would resend a user message on a timeout
or 5xx, and Letta has no per-agent lock. The bridge owns the retry policy.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from typing import Any, Sequence

from letta_client import AsyncLetta

from bridge.errors import Disposition, classify_error, describe_error
from bridge.gateway import (
    LettaError,
    LettaPermanentError,
    LettaRetryable,
    LettaUnavailable,
    TurnMessage,
    TurnResult,
)
from bridge.replies import field_of, parse_letta_response, parse_messages

# Fixed forever: changing it would make every earlier task unfindable in agent histories.
OTID_NAMESPACE = uuid.UUID("6f1d2b7e-4c1a-5b8e-9a43-2e7d0c5b9f11")
MAX_NAME_CHARS = 64
# OpenAI-style models drop a `name` with whitespace or any of <|\/> (LETTA_FACTS.md).
_NAME_UNSAFE = re.compile(r"[\s<|\\/>]+")


def otid_for(task_id: str) -> str:
    """The deterministic Letta otid of a task's user message."""
    return str(uuid.uuid5(OTID_NAMESPACE, task_id))


def safe_sender_name(name: str | None) -> str | None:
    """`name` usable by every model: no whitespace, no <|\\/>, no control characters, <= 64 chars."""
    if not name:
        return None
    text = unicodedata.normalize("NFC", name)
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Zl", "Zp"))
    text = _NAME_UNSAFE.sub("_", text).strip("_")
    return text[:MAX_NAME_CHARS] or None


def as_gateway_error(exc: BaseException) -> LettaError:
    """Our exception for any error raised by the SDK or the transport."""
    if isinstance(exc, LettaError):
        return exc
    disposition = classify_error(exc)
    text = describe_error(exc)
    if disposition is Disposition.UNAVAILABLE:
        return LettaUnavailable(text)
    if disposition is Disposition.RETRY:
        return LettaRetryable(text)
    return LettaPermanentError(text)


class LettaTurns:
    """send_turn / find_answered against a real Letta server."""

    def __init__(self, client: AsyncLetta, *, timeout: float, history_scan: int = 200):
        # with_options copies the client (sharing its HTTP pool): whatever the caller built,
        # message calls never retry by themselves.
        self._client = client.with_options(max_retries=0, timeout=timeout)
        self._history_scan = history_scan

    @classmethod
    def from_settings(cls, settings: Any) -> "LettaTurns":
        from vtuber_letta.letta_api import async_letta_client

        return cls(async_letta_client(settings, for_messages=True), timeout=settings.letta_timeout)

    @staticmethod
    def request_messages(messages: Sequence[TurnMessage], sender_name: str | None) -> list[dict[str, Any]]:
        """The `messages=[...]` body of one turn (one user message per task, each with its otid)."""
        name = safe_sender_name(sender_name)
        body = []
        for message in messages:
            item: dict[str, Any] = {"role": "user", "content": message.text, "otid": otid_for(message.task_id)}
            if name:
                item["name"] = name
            body.append(item)
        return body

    async def send_turn(self, agent_id: str, messages: Sequence[TurnMessage], *, sender_name: str | None) -> TurnResult:
        if not messages:
            raise ValueError("a turn needs at least one message")
        try:
            response = await self._client.agents.messages.create(
                agent_id, messages=self.request_messages(messages, sender_name)
            )
        except Exception as exc:  # every failure is mapped to the gateway's error contract
            raise as_gateway_error(exc) from exc
        return parse_letta_response(response)

    async def find_answered(self, agent_id: str, task_id: str) -> TurnResult | None:
        """Look through the newest `history_scan` messages for the task's user message and its run.

        Letta 0.16.8 answers `order="desc"` with the newest messages but lists them oldest first
        (the server reverses the page again), so the order of a page is not trusted: the messages
        are put in time order here before looking for what came after the task.
        """
        target = otid_for(task_id)
        try:
            page = await self._client.agents.messages.list(agent_id, order="desc", limit=self._history_scan)
        except Exception as exc:
            raise as_gateway_error(exc) from exc
        timeline = chronological(page.items)
        for index, message in enumerate(timeline):
            if field_of(message, "message_type") == "user_message" and field_of(message, "otid") == target:
                return answer_of_run(list(reversed(timeline[index + 1:])), message)
        return None


def chronological(messages: Sequence[Any]) -> list[Any]:
    """Messages oldest first, by their date; ties keep the order the server gave (stable sort)."""
    def when(message: Any) -> float:
        date = field_of(message, "date")
        return date.timestamp() if hasattr(date, "timestamp") else 0.0

    return sorted(messages, key=when)


def answer_of_run(newer: list[Any], user_message: Any) -> TurnResult | None:
    """The reply to user_message, from the messages newer than it (newest first).

    Messages of the same run (`run_id`) are the reply; without a run id, the messages up to the
    next user message. A run that produced nothing (it failed after storing the input) is not
    an answer: None, so the task is sent again.
    """
    run_id = field_of(user_message, "run_id")
    if run_id:
        reply = [m for m in reversed(newer) if field_of(m, "run_id") == run_id]
    else:
        reply = []
        for message in reversed(newer):
            if field_of(message, "message_type") == "user_message":
                break
            reply.append(message)
    parsed = parse_messages(reply)
    return parsed.result if parsed.produced else None
