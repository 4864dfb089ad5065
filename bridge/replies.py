"""Read an agent's turn out of Letta messages (letta-client 1.12.1 types, or the same as dicts).

A plain reply is `assistant_message`; a tool turn is `tool_call_message`, `tool_return_message`,
then usually `assistant_message` (letta_v1_agent answers in plain assistant text). What matters:
- reply text: the `assistant_message` contents joined (content is a str or a list of
  {"type": "text", "text": ...} parts);
- `stay_silent` called: nothing is spoken, the response is marked silent;
- `set_expression` / `play_motion`: avatar events, unless the call failed (status "error" or a
  return starting with "Error", which is how our tools report a bad name);
- a memory tool that succeeded: `memory_updated`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Iterable

from bridge.errors import Disposition, LettaError, classify_stop_reason
from bridge.gateway import AvatarCall, TurnResult
from tools.avatar_cues import AVATAR_TOOL_NAMES

SILENT_TOOL = "stay_silent"
AVATAR_TOOLS = AVATAR_TOOL_NAMES
# Ours (tools/) and Letta's built-in memory editors.
MEMORY_TOOLS = frozenset({
    "remember_viewer_fact", "forget_viewer_fact",
    "memory_insert", "memory_replace", "memory_rethink", "memory",
    "core_memory_append", "core_memory_replace", "archival_memory_insert",
})



def field_of(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def content_text(content: Any) -> str:
    """Text of a message content: a str, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif field_of(part, "type", "text") in (None, "text") and isinstance(field_of(part, "text"), str):
            parts.append(field_of(part, "text"))
    return "".join(parts)


def _tool_calls(message: Any) -> list[tuple[str | None, str, str]]:
    """(tool_call_id, name, arguments JSON) of a tool_call_message (multi-call list first)."""
    calls = field_of(message, "tool_calls")
    if not isinstance(calls, list) or not calls:
        single = field_of(message, "tool_call")
        calls = [single] if single is not None else []
    out = []
    for call in calls:
        name = field_of(call, "name")
        if name:
            out.append((field_of(call, "tool_call_id"), name, field_of(call, "arguments") or ""))
    return out


def _tool_returns(message: Any) -> list[tuple[str | None, str, str]]:
    """(tool_call_id, status, return text) of a tool_return_message."""
    returns = field_of(message, "tool_returns")
    if isinstance(returns, list) and returns:
        return [(field_of(r, "tool_call_id"), field_of(r, "status") or "success", content_text(field_of(r, "tool_return"))) for r in returns]
    return [(field_of(message, "tool_call_id"), field_of(message, "status") or "success", content_text(field_of(message, "tool_return")))]


def arguments_of(raw: str) -> dict[str, Any]:
    """A call's JSON arguments as a dict ({} when they are not a JSON object)."""
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ParsedTurn:
    result: TurnResult
    produced: bool  # any assistant text or tool call at all (False: a failed/empty run)


def parse_messages(messages: Iterable[Any]) -> ParsedTurn:
    """Parse the messages of one turn, in the order Letta returned them (oldest first)."""
    texts: list[str] = []
    ids: list[str] = []
    calls: list[tuple[str | None, str, str]] = []
    failed: set[str] = set()
    for message in messages:
        kind = field_of(message, "message_type")
        if kind == "assistant_message":
            texts.append(content_text(field_of(message, "content")))
            if field_of(message, "id"):
                ids.append(field_of(message, "id"))
        elif kind == "tool_call_message":
            calls.extend(_tool_calls(message))
        elif kind == "tool_return_message":
            for call_id, status, text in _tool_returns(message):
                if call_id and (status == "error" or text.lstrip().startswith("Error")):
                    failed.add(call_id)
    ok_calls = [(call_id, name, args) for call_id, name, args in calls if call_id is None or call_id not in failed]
    # stay_silent expresses intent even if its return was odd: never speak after it.
    silent_called = any(name == SILENT_TOOL for _, name, _ in calls)
    reply = "\n".join(t.strip() for t in texts if t and t.strip())
    silent = silent_called or not reply
    result = TurnResult(
        reply_text="" if silent else reply,
        avatar_calls=tuple(AvatarCall(name, arguments_of(args), call_id) for call_id, name, args in ok_calls
                           if name in AVATAR_TOOLS),
        silent=silent,
        memory_updated=any(name in MEMORY_TOOLS for _, name, _ in ok_calls),
        message_ids=tuple(ids),
        # Tools ran and nothing was said (nor silence chosen): the viewer still waits for words.
        unfinished=bool(calls) and not reply and not silent_called,
    )
    return ParsedTurn(result=result, produced=bool(texts or calls))


def merge_steps(earlier: TurnResult, step: TurnResult) -> TurnResult:
    """One turn out of a step that only called tools (earlier) and the agent's next step."""
    return replace(
        step,
        avatar_calls=earlier.avatar_calls + step.avatar_calls,
        memory_updated=earlier.memory_updated or step.memory_updated,
        message_ids=earlier.message_ids + step.message_ids,
        answered=earlier.answered,
        steps=earlier.steps + 1,
    )


def parse_letta_response(response: Any) -> TurnResult:
    """TurnResult of a `client.agents.messages.create(...)` LettaResponse.

    Raises a LettaError (bridge/errors.py: classify_stop_reason) when the run stopped with an error
    and produced nothing to say.
    """
    parsed = parse_messages(field_of(response, "messages") or [])
    stop = field_of(field_of(response, "stop_reason"), "stop_reason")
    failure = classify_stop_reason(stop)
    if parsed.result.unfinished and failure in (Disposition.RETRY, Disposition.UNAVAILABLE):
        # The step's tools ran but the run then failed: asking for the next step is still right
        # (the calls are in the history); an error with nothing produced is raised below.
        return parsed.result
    if not parsed.produced and failure is not None:
        raise LettaError.of(failure, f"turn stopped: {stop}")
    return parsed.result
