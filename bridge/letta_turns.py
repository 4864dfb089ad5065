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

import asyncio
import contextlib
import json
import re
import unicodedata
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Sequence

from letta_client import AsyncLetta

from bridge.errors import MODEL_UNAVAILABLE_TYPES, Disposition, LettaRetryable, LettaUnavailable, classify_stop_reason, letta_error
from bridge.gateway import AvatarCall, CueSink, TextSink, TurnMessage, TurnResult, WordsDoneSink
from bridge.recall_prefetch import RecallPrefetch
from bridge.replies import AVATAR_TOOLS, SILENT_TOOL, content_text, field_of, merge_steps, parse_letta_response, parse_messages

# Fixed forever: changing it would make every earlier task unfindable in agent histories.
OTID_NAMESPACE = uuid.UUID("6f1d2b7e-4c1a-5b8e-9a43-2e7d0c5b9f11")
MAX_NAME_CHARS = 64
# A turn asks for at most this many model steps: the first, plus continuations after steps that
# only called tools (a memory write, then a search, then the reply is 3).
MAX_STEPS_PER_TURN = 4
# A run still `running` this long after it began is taken for an orphan: Letta 0.16.8 never ends
# the runs of a server (or worker) that died mid-turn, and waiting for them would hold the viewer
# until fallback. Twice the turn's deadline, at least a minute: a live run outlives its client by
# the model's own slowness only, and one hung for longer than this may, when it ends, make a second
# turn (a trade for answering at all after a crash; docs/RELIABILITY.md).
MIN_ORPHANED_RUN_AGE_S = 60.0
RUN_POLL_S = 0.25
# What the agent reads before a step the bridge asks for (a system message, persisted in history).
CONTINUE_NOTE = ("[turn continues] Your tool calls above have run. The viewer is still waiting: "
                 "now say your spoken reply (or call stay_silent).")
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


class _SinkFailed(Exception):
    """Carries an exception of the caller's on_text through the Letta error mapping unchanged."""


class _Sinks:
    """The caller's callbacks for one turn; on_words_done is called at most once per turn, on_cue
    once per avatar call."""

    def __init__(self, on_text: TextSink | None, on_words_done: WordsDoneSink | None, on_cue: CueSink | None = None):
        self.on_text = on_text
        self._on_words_done = on_words_done
        self._on_cue = on_cue
        self._called = False

    async def cues(self, calls: list[AvatarCall]) -> None:
        if self._on_cue is not None:
            for call in calls:
                await self._on_cue(call)

    async def words_done(self) -> None:
        if self._on_words_done is not None and not self._called:
            self._called = True
            await self._on_words_done()


class LettaTurns:
    """send_turn / find_answered against a real Letta server."""

    def __init__(self, client: AsyncLetta, *, timeout: float, history_scan: int = 200,
                 recall: RecallPrefetch | None = None):
        # with_options copies the client (sharing its HTTP pool): whatever the caller built,
        # message calls never retry by themselves.
        self._client = client.with_options(max_retries=0, timeout=timeout)
        self._recall = recall  # long-term memory searched before the turn (None: off)
        self._deadline = timeout  # the whole turn, every step and the stream's keep-alives included
        self._history_scan = history_scan
        self._draining: set[asyncio.Task] = set()  # streamed responses being read to their end

    @property
    def orphan_age(self) -> float:
        return max(MIN_ORPHANED_RUN_AGE_S, 2 * self._deadline)

    @classmethod
    def from_settings(cls, settings: Any) -> "LettaTurns":
        from vtuber_letta.letta_api import async_letta_client

        # Each turn in flight holds a connection, and so does each response still being drained.
        client = async_letta_client(settings, for_messages=True, connections=2 * settings.bridge_concurrency)
        return cls(client, timeout=settings.letta_timeout, recall=RecallPrefetch.from_settings(settings))

    async def aclose(self) -> None:
        """Close the connections (a process that makes several LettaTurns, e.g. a test, one per
        event loop; the bridge's lives as long as its process)."""
        await self._client.close()
        if self._recall is not None:
            await self._recall.aclose()

    @staticmethod
    def request_messages(messages: Sequence[TurnMessage], sender_name: str | None,
                         recalled: str | None = None) -> list[dict[str, Any]]:
        """The `messages=[...]` body of one turn (one user message per task, each with its otid),
        after the note of what long-term memory holds about them (`recalled`, a system message of
        its own otid: older than the turn's user messages, so never read as part of the reply)."""
        name = safe_sender_name(sender_name)
        body: list[dict[str, Any]] = []
        if recalled:
            body.append({"role": "system", "content": recalled, "otid": otid_for(f"{messages[0].task_id}#recalled")})
        for message in messages:
            item: dict[str, Any] = {"role": "user", "content": message.text, "otid": otid_for(message.task_id)}
            if name:
                item["name"] = name
            body.append(item)
        return body

    async def send_turn(
        self,
        agent_id: str,
        messages: Sequence[TurnMessage],
        *,
        sender_name: str | None,
        on_text: TextSink | None = None,
        on_words_done: WordsDoneSink | None = None,
        on_cue: CueSink | None = None,
    ) -> TurnResult:
        """One turn. With `on_text`, the reply is streamed token by token (Letta's `stream_tokens`)
        and every piece of assistant text is handed to on_text as it arrives; `on_words_done` is
        called when a tool call starts after the words of a step (see StreamedTurn.words_done), and
        `on_cue` with each avatar call once its arguments are complete (StreamedTurn.take_cues).

        One model step per request (`max_steps=1`): a step that speaks (with or without tool calls
        in the same response) ends the turn, so an avatar cue or a memory write written beside the
        reply costs no model call of its own. A step that only called tools gets one more step
        (`continue_turn`), up to MAX_STEPS_PER_TURN; stay_silent ends the turn."""
        if not messages:
            raise ValueError("a turn needs at least one message")
        sinks = _Sinks(on_text, on_words_done, on_cue)
        async with self._turn_deadline():
            recalled = await self._recall.note_for(agent_id, [m.text for m in messages]) if self._recall else None
            result = await self._step(agent_id, self.request_messages(messages, sender_name, recalled), sinks)
            if result.unfinished:
                result = await self._continue(agent_id, messages[-1].task_id, result, sinks)
        if self._recall is not None:
            if recalled:
                self._recall.delivered(agent_id, recalled)
            if result.memory_updated:
                self._recall.memory_changed(agent_id)
        return result

    async def continue_turn(
        self,
        agent_id: str,
        task_id: str,
        so_far: TurnResult,
        *,
        on_text: TextSink | None = None,
        on_words_done: WordsDoneSink | None = None,
        on_cue: CueSink | None = None,
    ) -> TurnResult:
        """Ask the agent for its next step after a step that called tools without speaking (also a
        turn found half done in the history after a crash). Each step's request carries one system
        note (Letta refuses an empty request), with an otid derived from the task, so the whole turn
        stays findable from the task's user message."""
        async with self._turn_deadline():
            return await self._continue(agent_id, task_id, so_far, _Sinks(on_text, on_words_done, on_cue))

    async def _continue(self, agent_id: str, task_id: str, so_far: TurnResult, sinks: "_Sinks") -> TurnResult:
        result = so_far
        for step in range(so_far.steps, MAX_STEPS_PER_TURN):
            note = {"role": "system", "content": CONTINUE_NOTE, "otid": otid_for(f"{task_id}#step-{step + 1}")}
            result = merge_steps(result, await self._step(agent_id, [note], sinks))
            if not result.unfinished:
                return result
        return replace(result, unfinished=False, silent=not result.reply_text)

    @contextlib.asynccontextmanager
    async def _turn_deadline(self) -> AsyncIterator[None]:
        """LETTA_TIMEOUT bounds the whole turn: a stream's keep-alive pings (every 20 s) would
        otherwise keep the read timeout from ever firing on a hung model. The run may go on in
        Letta after this: the retry settles it first (settle_runs)."""
        try:
            async with asyncio.timeout(self._deadline):
                yield
        except TimeoutError as exc:
            raise LettaRetryable(f"turn took longer than LETTA_TIMEOUT ({self._deadline:g}s)") from exc

    async def settle_runs(self, agent_id: str) -> int:
        """Before anything is sent again to the agent: wait (up to LETTA_TIMEOUT) until none of its
        runs is in flight, and return how many were. An earlier attempt's run goes on after its
        client gave up, and its messages (the task's otid among them) are stored only when its step
        ends: sending while it runs would make a second turn. Cancelling does not help: Letta
        0.16.8 checks for a cancel only between steps, so the step in flight still runs and stores
        its turn. A run still in flight at the end raises LettaUnavailable (the retry comes back
        later); one older than `orphan_age` is an orphan and does not count."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self._deadline
        seen: set[str] = set()
        while True:
            try:
                page = await self._client.runs.list(agent_id=agent_id, active=True, limit=20)
                runs = getattr(page, "items", page)
            except Exception as exc:
                raise letta_error(exc) from exc
            live = [field_of(run, "id") for run in runs if not _orphaned(run, self.orphan_age)]
            seen.update(live)
            if not live:
                return len(seen)
            if loop.time() >= until:
                raise LettaUnavailable(f"an earlier run of agent {agent_id} is still in flight ({live[0]})")
            await asyncio.sleep(RUN_POLL_S)

    async def _step(self, agent_id: str, body: list[dict[str, Any]], sinks: "_Sinks") -> TurnResult:
        try:
            if sinks.on_text is None:
                response = await self._client.agents.messages.create(agent_id, messages=body, max_steps=1)
                return parse_letta_response(response)
            stream = await self._client.agents.messages.create(
                agent_id, messages=body, max_steps=1, streaming=True, stream_tokens=True
            )
            turn = StreamedTurn()
            # Letta sends "[DONE]" and then goes on working (~0.1 s here) before it ends the body. The
            # SDK's iterator stops at "[DONE]" and closes the response unread, so httpx drops the
            # connection: a new TCP connection per turn. We stop at "[DONE]" too (the reply is
            # complete) but let a background task read the rest, which returns the connection to
            # the pool. Reading the events ourselves also skips building a model object per token.
            response = stream.response
            events = sse_events(response)
            done = False
            try:
                async for event, data in events:
                    if event == "error":
                        # Letta sends the run's stop reason just before: llm_api_error is the model
                        # endpoint failing mid-stream, which no retry of this task fixes by itself.
                        if (classify_stop_reason(turn.stop_reason) is Disposition.UNAVAILABLE
                                or _error_type(data) in MODEL_UNAVAILABLE_TYPES):
                            raise LettaUnavailable(f"the model failed mid-turn: {data[:300]}")
                        raise LettaRetryable(f"turn failed: {data[:300]}")
                    if data.startswith("[DONE]"):
                        done = True
                        break
                    delta = turn.add(json.loads(data))
                    try:
                        if delta:
                            await sinks.on_text(delta)
                        if turn.words_done:
                            await sinks.words_done()
                        await sinks.cues(turn.take_cues())
                    except Exception as exc:
                        raise _SinkFailed() from exc
            finally:
                if done:
                    self._drain(events, response)
                else:
                    await response.aclose()
            if not done and not turn.stopped:
                # Cut (proxy, server restart, a worker killed): what came is not the whole answer.
                raise LettaRetryable("the stream ended before [DONE] and without a stop reason")
            return turn.result()
        except _SinkFailed as failed:  # the caller's own failure (e.g. Redis), not Letta's
            raise failed.__cause__ from None
        except Exception as exc:  # every failure is mapped to the gateway's error contract
            raise letta_error(exc) from exc

    def _drain(self, events: AsyncIterator[Any], response: Any) -> None:
        """Finish reading a streamed response in the background, then release its connection."""
        async def drain() -> None:
            try:
                async for _ in events:
                    pass
            except Exception:  # the reply is already in hand: a broken tail only costs the connection
                pass
            finally:
                await response.aclose()

        task = asyncio.create_task(drain())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def find_answered(self, agent_id: str, task_ids: Sequence[str]) -> TurnResult | None:
        """The turn that answered task_ids[0], from the newest `history_scan` messages; its
        `answered` lists which of task_ids that same turn carried (a coalesced turn carries several).

        Letta 0.16.8 answers `order="desc"` with the newest messages but lists them oldest first
        (the server reverses the page again), so the order of a page is not trusted: the messages
        are put in time order here before looking for what came after the task.
        """
        target = otid_for(task_ids[0])
        try:
            page = await self._client.agents.messages.list(agent_id, order="desc", limit=self._history_scan)
        except Exception as exc:
            raise letta_error(exc) from exc
        timeline = chronological(page.items)
        for index, message in enumerate(timeline):
            if field_of(message, "message_type") == "user_message" and field_of(message, "otid") == target:
                found = answer_of_run(list(reversed(timeline[index + 1:])), message)
                if found is None:
                    return None
                result, otids = found
                return replace(result, answered=tuple(t for t in task_ids if otid_for(t) in otids))
        return None


class StreamedTurn:
    """Rebuilds the messages of one turn from Letta's token stream (letta-client 1.12.1 chunks).

    Token streaming sends each assistant message as many `assistant_message` chunks sharing one
    id (content = the new text), tool calls as `tool_call_message` chunks whose arguments come in
    pieces, tool returns whole, then `stop_reason` and `usage_statistics`. `add` returns the new
    assistant text of a chunk ("\n" first when a new assistant message starts, the separator
    `parse_messages` puts between messages); `result` parses the rebuilt messages like a
    non-streamed response, so both paths answer alike.

    `words_done` turns True when a tool call (other than stay_silent) starts right after assistant
    text: models write their words first and their tool calls after them, so the reply is complete
    while Letta still has the calls' arguments to receive and the tools to run (~0.1 s each, a
    memory write more) before the step ends. Text that comes after a tool call anyway still
    arrives through `add`.

    `take_cues` hands over each avatar call (set_expression / play_motion) once its arguments are
    complete: when what has come of them parses as a JSON object. A call's arguments are one JSON
    object, so the first piece that makes them parse is their last; Letta runs the tool only after
    the model's whole response. A call whose arguments never parse is never handed over (Letta
    gives the tool no arguments then, and the tool refuses). Calls without a tool_call_id neither:
    nothing could mark them as published.
    """

    def __init__(self) -> None:
        self._messages: list[dict[str, Any]] = []
        self._by_id: dict[str, dict[str, Any]] = {}
        self._calls: dict[str, dict[str, Any]] = {}
        self._stop: str | None = None
        self._error: str | None = None
        self._spoke = False
        self.words_done = False
        self._unnamed_after_words: dict[str, Any] | None = None
        self._cues: list[AvatarCall] = []
        self._cued: set[str] = set()

    def add(self, chunk: Any) -> str:
        kind = field_of(chunk, "message_type")
        if kind == "assistant_message":
            text = content_text(field_of(chunk, "content"))
            message = self._assistant(field_of(chunk, "id"))
            message["content"] += text
            if not text:
                return ""
            first_piece = message["content"] == text
            out = ("\n" if first_piece and self._spoke else "") + text
            self._spoke = True
            return out
        if kind == "tool_call_message":
            after_words = self._ends_with_words()
            touched = self._add_tool_call(chunk)
            for each in touched:
                self._check_cue(each)
            call = touched[0] if touched else None
            if call is not None and (after_words or call is self._unnamed_after_words):
                # Decided once the call's name is known (it may come in a later piece).
                self._unnamed_after_words = None if call["name"] else call
                self.words_done = self.words_done or call["name"] not in ("", SILENT_TOOL)
        elif kind == "tool_return_message":
            self._messages.append({
                "message_type": kind,
                "tool_returns": field_of(chunk, "tool_returns"),
                "tool_call_id": field_of(chunk, "tool_call_id"),
                "status": field_of(chunk, "status"),
                "tool_return": field_of(chunk, "tool_return"),
            })
        elif kind == "stop_reason":
            self._stop = field_of(chunk, "stop_reason")
        elif kind == "error_message":
            self._error = str(field_of(chunk, "message") or field_of(chunk, "error_type") or "error")
        return ""

    def take_cues(self) -> list[AvatarCall]:
        """The avatar calls completed since the last take, in the order they completed."""
        cues, self._cues = self._cues, []
        return cues

    def _check_cue(self, call: dict[str, Any]) -> None:
        call_id = call["tool_call_id"]
        if call["name"] not in AVATAR_TOOLS or not call_id or call_id in self._cued:
            return
        try:
            args = json.loads(call["arguments"])
        except ValueError:
            return  # not complete yet
        if isinstance(args, dict):
            self._cued.add(call_id)
            self._cues.append(AvatarCall(call["name"], args, call_id))

    @property
    def stopped(self) -> bool:
        """Letta sent the run's stop reason (the step ended, well or not)."""
        return self._stop is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop

    def result(self) -> TurnResult:
        if self._error is not None and not self._messages:
            raise LettaRetryable(f"turn failed: {self._error}")
        stop = {"stop_reason": self._stop} if self._stop else None
        return parse_letta_response({"messages": self._messages, "stop_reason": stop})

    def _ends_with_words(self) -> bool:
        last = self._messages[-1] if self._messages else None
        return last is not None and last["message_type"] == "assistant_message" and last["content"].strip() != ""

    def _assistant(self, message_id: str | None) -> dict[str, Any]:
        """The assistant message a text chunk belongs to (a chunk without id: the latest one)."""
        message = self._by_id.get(message_id) if message_id else None
        if message is None and not message_id and self._messages and self._messages[-1]["message_type"] == "assistant_message":
            message = self._messages[-1]
        if message is None:
            message = {"message_type": "assistant_message", "id": message_id, "content": ""}
            if message_id:
                self._by_id[message_id] = message
            self._messages.append(message)
        return message

    def _add_tool_call(self, chunk: Any) -> list[dict[str, Any]]:
        """Adds the pieces of a tool_call_message chunk; returns the calls it touched, in order."""
        touched: list[dict[str, Any]] = []
        deltas = field_of(chunk, "tool_calls")
        if not isinstance(deltas, list) or not deltas:
            single = field_of(chunk, "tool_call")
            deltas = [single] if single is not None else []
        for delta in deltas:
            call_id = field_of(delta, "tool_call_id") or (next(reversed(self._calls)) if self._calls else "")
            call = self._calls.get(call_id)
            if call is None:
                call = self._calls[call_id] = {"tool_call_id": call_id or None, "name": "", "arguments": ""}
                self._messages.append({"message_type": "tool_call_message", "tool_calls": [call]})
            call["name"] = call["name"] or field_of(delta, "name") or ""
            call["arguments"] += field_of(delta, "arguments") or ""
            if call not in touched:
                touched.append(call)
        return touched


async def sse_events(response: Any) -> AsyncIterator[tuple[str | None, str]]:
    """(event, data) of each server-sent event of an httpx response, read to the end of the body."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield event, "\n".join(data)


def _error_type(data: str) -> str | None:
    """The `error_type` of an SSE error event's data (e.g. "llm_rate_limit"), if it has one."""
    try:
        kind = json.loads(data).get("error_type")
    except (ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _orphaned(run: Any, orphan_age: float) -> bool:
    created = field_of(run, "created_at")
    if not isinstance(created, datetime):
        return False
    if created.tzinfo is None:  # Letta stores UTC
        created = created.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - created).total_seconds() > orphan_age


def chronological(messages: Sequence[Any]) -> list[Any]:
    """Messages oldest first, by their date; ties keep the order the server gave (stable sort)."""
    def when(message: Any) -> float:
        date = field_of(message, "date")
        return date.timestamp() if hasattr(date, "timestamp") else 0.0

    return sorted(messages, key=when)


def answer_of_run(newer: list[Any], user_message: Any) -> tuple[TurnResult, set[str]] | None:
    """The reply to user_message, from the messages newer than it (newest first), and the otids
    of the user messages that turn carried (user_message's own included).

    The turn is every message after it up to the next user message of another run: the reply of
    its own run and of the steps the bridge asked for after tool-only steps (continue_turn). A
    turn that produced nothing (it failed after storing the input) is not an answer: None, so the
    task is sent again. One found half done (tools ran, nothing said yet) comes back `unfinished`.
    """
    run_id = field_of(user_message, "run_id")
    otids = {field_of(user_message, "otid")}
    runs = {run_id}
    reply = []
    for message in reversed(newer):
        kind, run = field_of(message, "message_type"), field_of(message, "run_id")
        if kind == "user_message":
            if run_id and run == run_id:
                otids.add(field_of(message, "otid"))
                continue
            break
        if kind == "system_message" and content_text(field_of(message, "content")).startswith(CONTINUE_NOTE):
            runs.add(run)  # a step the bridge asked for: part of this turn
            continue
        if run_id is None or run in runs:
            reply.append(message)
    parsed = parse_messages(reply)
    if not parsed.produced:
        return None
    return replace(parsed.result, steps=min(len(runs), MAX_STEPS_PER_TURN)), otids
