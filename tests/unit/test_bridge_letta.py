"""The Letta side of the bridge without a server: error classification (a table), reply parsing,
and LettaTurns driving the real letta-client 1.12.1 SDK against an httpx mock transport (so the
request bodies and response types are the SDK's own, not hand-written mocks)."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import httpx
import letta_client
import pytest
import redis
from letta_client import AsyncLetta

from bridge.errors import Disposition, LettaPermanentError, LettaRetryable, LettaUnavailable, classify_error, classify_status
from bridge.gateway import AvatarCall, TurnMessage
from bridge.letta_turns import CONTINUE_NOTE, MAX_STEPS_PER_TURN, LettaTurns, StreamedTurn, answer_of_run, otid_for, safe_sender_name, sse_events
from bridge.replies import content_text, parse_letta_response, parse_messages
from bridge.viewer_stats import ViewerTotals, format_support

REQ = httpx.Request("POST", "http://letta.test/v1/agents/agent-1/messages")


def status_error(status: int, error_type: str | None = None) -> letta_client.APIStatusError:
    """An SDK status error; with error_type, the body Letta 0.16.8 sends for a model failure."""
    body = {"error": {"type": error_type, "message": "…", "detail": "…"}} if error_type else None
    response = httpx.Response(status, request=REQ, json=body or {"detail": "x"})
    cls = {400: letta_client.BadRequestError, 401: letta_client.AuthenticationError, 404: letta_client.NotFoundError,
           409: letta_client.ConflictError, 422: letta_client.UnprocessableEntityError,
           429: letta_client.RateLimitError}.get(status, letta_client.InternalServerError if status >= 500 else letta_client.APIStatusError)
    return cls(f"HTTP {status}", response=response, body=body)


@pytest.mark.parametrize(
    "exc, expected",
    [
        (LettaUnavailable("down"), Disposition.UNAVAILABLE),
        (LettaRetryable("busy"), Disposition.RETRY),
        (LettaPermanentError("bad"), Disposition.GIVE_UP),
        (letta_client.APIConnectionError(request=REQ), Disposition.UNAVAILABLE),
        (letta_client.APITimeoutError(request=REQ), Disposition.UNAVAILABLE),
        (httpx.ConnectError("refused"), Disposition.UNAVAILABLE),
        (httpx.ReadTimeout("slow"), Disposition.UNAVAILABLE),
        (ConnectionRefusedError(), Disposition.UNAVAILABLE),
        (asyncio.TimeoutError(), Disposition.UNAVAILABLE),
        (status_error(400), Disposition.GIVE_UP),
        (status_error(404), Disposition.GIVE_UP),
        (status_error(422), Disposition.GIVE_UP),
        (status_error(401), Disposition.UNAVAILABLE),
        (status_error(409), Disposition.RETRY),
        (status_error(429), Disposition.RETRY),
        (status_error(500), Disposition.RETRY),
        (status_error(502), Disposition.UNAVAILABLE),
        (status_error(503), Disposition.UNAVAILABLE),
        (status_error(504), Disposition.UNAVAILABLE),
        # The model behind Letta down, rate-limited, timing out, out of credits or refusing the key:
        # Letta cannot answer now (wait or fall back), whatever the HTTP status says.
        (status_error(500, "llm_error"), Disposition.UNAVAILABLE),
        (status_error(429, "llm_rate_limit"), Disposition.UNAVAILABLE),
        (status_error(504, "llm_timeout"), Disposition.UNAVAILABLE),
        (status_error(402, "llm_insufficient_credits"), Disposition.UNAVAILABLE),
        (status_error(401, "llm_authentication"), Disposition.UNAVAILABLE),
        (status_error(400, "llm_bad_request"), Disposition.GIVE_UP),  # this request, not the model
        (status_error(500, "internal_error"), Disposition.RETRY),
        (redis.exceptions.LockError("viewer lock not acquired"), Disposition.UNAVAILABLE),  # not about the task
        (redis.exceptions.TimeoutError("Timeout reading from socket"), Disposition.UNAVAILABLE),
        (ValueError("a bug"), Disposition.GIVE_UP),
        (KeyError("agent"), Disposition.GIVE_UP),
    ],
)
def test_classify_error(exc, expected):
    assert classify_error(exc) is expected


@pytest.mark.parametrize("status, expected", [(413, Disposition.GIVE_UP), (507, Disposition.RETRY), (408, Disposition.RETRY)])
def test_classify_status(status, expected):
    assert classify_status(status) is expected


# ---------------------------------------------------------------- replies

_ids = itertools.count(1)


def msg(kind: str, **fields) -> dict:
    return {"id": f"message-{next(_ids)}", "date": "2025-08-29T00:00:00Z", "message_type": kind, **fields}


def tool_call(name: str, args: dict, call_id: str) -> dict:
    return msg("tool_call_message", tool_call={"name": name, "arguments": json.dumps(args), "tool_call_id": call_id})


def tool_return(call_id: str, text: str, status: str = "success") -> dict:
    return msg("tool_return_message", tool_call_id=call_id, status=status, tool_return=text)


def letta_response(messages: list[dict], stop: str = "end_turn") -> letta_client.types.agents.LettaResponse:
    return letta_client.types.agents.LettaResponse.model_validate(
        {"messages": messages, "stop_reason": {"stop_reason": stop, "message_type": "stop_reason"}, "usage": {}}
    )


def test_content_text_accepts_str_and_parts():
    assert content_text("hi") == "hi"
    assert content_text([{"type": "text", "text": "a"}, {"type": "image", "source": {}}, {"text": "b"}]) == "ab"


def test_plain_reply_with_real_sdk_types():
    result = parse_letta_response(letta_response([msg("assistant_message", content=[{"type": "text", "text": "你好呀"}])]))
    assert (result.reply_text, result.silent, result.memory_updated, result.avatar_calls) == ("你好呀", False, False, ())


def test_tool_turn_collects_avatar_calls_and_memory_updates():
    result = parse_letta_response(letta_response([
        tool_call("set_expression", {"expression": "happy", "intensity": 0.8}, "c1"),
        tool_return("c1", "Expression set: happy (0.80)"),
        tool_call("play_motion", {"motion": "dab"}, "c2"),
        tool_return("c2", "Error: unknown motion 'dab'. Valid: wave, bow"),
        tool_call("remember_viewer_fact", {"fact": "likes cats", "category": "likes"}, "c3"),
        tool_return("c3", "Remembered (likes): likes cats"),
        msg("assistant_message", content="猫猫好可爱！"),
    ]))
    assert result.reply_text == "猫猫好可爱！"
    assert result.avatar_calls == (AvatarCall("set_expression", {"expression": "happy", "intensity": 0.8}, "c1"),)
    assert result.memory_updated is True


def test_failed_memory_tool_is_not_a_memory_update():
    parsed = parse_messages([tool_call("remember_viewer_fact", {}, "c1"), tool_return("c1", "x", status="error"),
                             msg("assistant_message", content="ok")])
    assert parsed.result.memory_updated is False


def test_stay_silent_means_no_words():
    result = parse_letta_response(letta_response([
        tool_call("stay_silent", {"reason": "spam"}, "c1"), tool_return("c1", "Staying silent: spam"),
        msg("assistant_message", content="(ignoring)"),
    ]))
    assert (result.silent, result.reply_text) == (True, "")


@pytest.mark.parametrize(
    "stop, error",
    [("llm_api_error", LettaUnavailable), ("error", LettaRetryable), ("invalid_llm_response", LettaRetryable),
     ("requires_approval", LettaPermanentError)],
)
def test_a_run_that_failed_without_output_raises(stop, error):
    with pytest.raises(error):
        parse_letta_response(letta_response([], stop=stop))


def test_max_steps_with_text_is_still_an_answer():
    assert parse_letta_response(letta_response([msg("assistant_message", content="hm")], stop="max_steps")).reply_text == "hm"


# ---------------------------------------------------------------- LettaTurns over the real SDK

def test_otid_is_deterministic_and_distinct():
    assert otid_for("t-1") == otid_for("t-1") != otid_for("t-2")
    assert len(otid_for("t-1")) == 36


@pytest.mark.parametrize(
    "name, expected",
    [("小明@bilibili", "小明@bilibili"), ("Alice Smith", "Alice_Smith"), ("<|im_end|>", "im_end"),
     ("a/b\\c", "a_b_c"), ("  ", None), (None, None), ("x" * 100, "x" * 64), ("zero\u200bwidth", "zerowidth")],
)
def test_safe_sender_name(name, expected):
    assert safe_sender_name(name) == expected


class FakeLettaHttp:
    """An httpx handler standing in for Letta 0.16.8's message routes."""

    def __init__(self):
        self.requests: list[httpx.Request] = []
        self.create_status = 200
        self.history: list[dict] = []  # oldest first, each with a later date than the one before
        self.tool_only_steps = 0  # the next N sends: the step only calls a tool (stop: max_steps)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "POST":
            if self.create_status != 200:
                return httpx.Response(self.create_status, json={"detail": "unavailable"})
            body = json.loads(request.content)
            users = body["messages"]
            run = f"run-{len(self.requests)}"
            reply = [
                msg("tool_call_message", tool_call={"name": "set_expression", "arguments": '{"expression": "happy"}', "tool_call_id": "c1"}, run_id=run),
                msg("tool_return_message", tool_call_id="c1", status="success", tool_return="Expression set: happy", run_id=run),
                msg("assistant_message", id=f"m-{run}", content=f"reply to {users[-1]['content']}. Bye!", run_id=run),
            ]
            stop = "end_turn"
            if self.tool_only_steps:
                self.tool_only_steps -= 1
                reply, stop = reply[:2], "max_steps"
            kinds = {"user": "user_message", "system": "system_message"}
            stored = [msg(kinds[u["role"]], content=u["content"], otid=u["otid"], run_id=run) for u in users]
            for message in [*stored, *reply]:
                message["date"] = f"2025-08-29T00:00:{len(self.history):02d}Z"
                self.history.append(message)
            if body.get("streaming"):
                return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                      content=sse(token_chunks(reply, stop)))
            return httpx.Response(200, json={"messages": reply, "stop_reason": {"stop_reason": stop}, "usage": {}})
        # As Letta 0.16.8 really answers ?order=desc&limit=N: the NEWEST N messages, listed OLDEST first
        # (letta/server/server.py get_agent_recall_async reverses the page again).
        assert request.url.params.get("order") == "desc"
        limit = int(request.url.params.get("limit", 100))
        return httpx.Response(200, json=self.history[-limit:])


def token_chunks(reply: list[dict], stop: str = "end_turn") -> list[dict]:
    """The reply as Letta 0.16.8 streams it with stream_tokens=True (shapes seen on a real server):
    a ping, tool-call arguments in pieces, assistant text a few characters per chunk under one id."""
    chunks = [{"id": "ping-1", "message_type": "ping", "date": "2025-08-29T00:00:00Z"}]
    for message in reply:
        if message["message_type"] == "tool_call_message":
            call = message["tool_call"]
            chunks.append({**message, "tool_call": {"name": call["name"], "tool_call_id": call["tool_call_id"]}})
            for i in range(0, len(call["arguments"]), 7):
                chunks.append({**message, "tool_call": {"arguments": call["arguments"][i:i + 7], "tool_call_id": call["tool_call_id"]}})
        elif message["message_type"] == "assistant_message":
            text = message["content"]
            chunks += [{**message, "content": text[i:i + 3]} for i in range(0, len(text), 3)]
        else:
            chunks.append(message)
    return chunks + [{"message_type": "stop_reason", "stop_reason": stop},
                     {"message_type": "usage_statistics", "completion_tokens": 9}]


def sse(chunks: list[dict]) -> bytes:
    return "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks).encode()


def turns_with(handler: FakeLettaHttp, history_scan: int = 200) -> LettaTurns:
    client = AsyncLetta(
        base_url="http://letta.test", api_key="secret",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)), max_retries=5,
    )
    return LettaTurns(client, timeout=5, history_scan=history_scan)


def test_send_turn_body_and_reply():
    http = FakeLettaHttp()

    async def scenario():
        turns = turns_with(http)
        return await turns.send_turn("agent-1", [TurnMessage("t-1", "你好")], sender_name="Alice Smith@twitch")

    result = asyncio.run(scenario())
    assert result.reply_text == "reply to 你好. Bye!"
    assert result.avatar_calls == (AvatarCall("set_expression", {"expression": "happy"}, "c1"),)
    request = http.requests[0]
    assert request.url.path == "/v1/agents/agent-1/messages"
    assert request.headers["authorization"] == "Bearer secret"
    assert json.loads(request.content) == {
        "messages": [{"role": "user", "content": "你好", "otid": otid_for("t-1"), "name": "Alice_Smith@twitch"}],
        "max_steps": 1,  # one model step per request: a reply beside its tool calls ends the turn
    }


@pytest.mark.parametrize("streamed", [False, True])
def test_a_step_that_only_called_tools_gets_one_more_step_and_one_turn_comes_back(streamed):
    http = FakeLettaHttp()
    http.tool_only_steps = 1
    pieces: list[str] = []

    async def on_text(piece: str) -> None:
        pieces.append(piece)

    async def scenario():
        return await turns_with(http).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None,
                                                on_text=on_text if streamed else None)

    result = asyncio.run(scenario())
    posts = [json.loads(r.content) for r in http.requests if r.method == "POST"]
    assert len(posts) == 2 and all(p["max_steps"] == 1 for p in posts)
    assert posts[1]["messages"] == [{"role": "system", "content": CONTINUE_NOTE, "otid": otid_for("t-1#step-2")}]
    assert result.reply_text == f"reply to {CONTINUE_NOTE}. Bye!" and not result.silent and not result.unfinished
    assert len(result.avatar_calls) == 2 and result.steps == 2  # the cue of the tool-only step is kept
    if streamed:
        assert "".join(pieces) == result.reply_text


def test_a_turn_that_only_ever_calls_tools_stops_after_the_step_limit_without_words():
    http = FakeLettaHttp()
    http.tool_only_steps = 99
    result = asyncio.run(turns_with(http).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None))
    assert len([r for r in http.requests if r.method == "POST"]) == MAX_STEPS_PER_TURN
    assert result.silent and result.reply_text == "" and not result.unfinished


def test_a_turn_found_half_done_in_the_history_is_finished_not_replayed_as_silence():
    http = FakeLettaHttp()
    http.tool_only_steps = 1
    asyncio.run(turns_with(http).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None))
    # Cut the history after the first step, as a crash between the two requests would leave it.
    http.history = [m for m in http.history if m["run_id"] == "run-1"]
    turns = turns_with(http)
    found = asyncio.run(turns.find_answered("agent-1", ["t-1"]))
    assert found is not None and found.unfinished and found.reply_text == "" and found.steps == 1
    done = asyncio.run(turns.continue_turn("agent-1", "t-1", found))
    assert done.reply_text.startswith("reply to ") and not done.unfinished and done.answered == ("t-1",)
    # And the whole turn, found again, is complete: both runs belong to it.
    again = asyncio.run(turns_with(http).find_answered("agent-1", ["t-1"]))
    assert not again.unfinished and again.reply_text == done.reply_text and again.steps == 2


def test_send_turn_never_retries_by_itself_and_maps_errors():
    http = FakeLettaHttp()
    http.create_status = 503

    async def scenario():
        await turns_with(http).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None)

    with pytest.raises(LettaUnavailable):
        asyncio.run(scenario())
    assert len(http.requests) == 1  # the client was built with max_retries=5; LettaTurns forces 0
    http.create_status = 422
    with pytest.raises(LettaPermanentError):
        asyncio.run(scenario())


def test_connection_refused_is_unavailable():
    async def scenario():
        client = AsyncLetta(base_url="http://127.0.0.1:9", api_key="x")
        await LettaTurns(client, timeout=2).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None)

    with pytest.raises(LettaUnavailable):
        asyncio.run(scenario())


def test_find_answered_finds_the_run_of_the_task_in_lettas_real_order():
    http = FakeLettaHttp()

    async def scenario():
        turns = turns_with(http)
        for i in range(1, 4):
            await turns.send_turn("agent-1", [TurnMessage(f"t-{i}", f"m{i}")], sender_name=None)
        results = [await turns.find_answered("agent-1", [f"t-{i}"]) for i in (1, 2, 3)]
        turns_small = turns_with(http, history_scan=5)
        missing = await turns_small.find_answered("agent-1", ["t-1"])  # beyond the scan limit
        unknown = await turns.find_answered("agent-1", ["t-9"])
        return results, missing, unknown

    results, missing, unknown = asyncio.run(scenario())
    assert [r.reply_text if r else None for r in results] == ["reply to m1. Bye!", "reply to m2. Bye!", "reply to m3. Bye!"]
    assert missing is None and unknown is None
    gets = [r for r in http.requests if r.method == "GET"]
    assert all(g.url.params["order"] == "desc" for g in gets)


def test_find_answered_does_not_trust_the_page_order():
    # Whatever order a page comes in, what answered the task is what came after it in time.
    user = msg("user_message", content="hi", otid=otid_for("t-1"), run_id="run-1", date="2025-08-29T00:00:01Z")
    reply = msg("assistant_message", content="mine", run_id="run-1", date="2025-08-29T00:00:02Z")
    other = msg("assistant_message", content="older turn", run_id="run-0", date="2025-08-29T00:00:00Z")
    for page in ([other, user, reply], [reply, user, other]):
        http = FakeLettaHttp()
        http.history = page
        found = asyncio.run(turns_with(http).find_answered("agent-1", ["t-1"]))
        assert found is not None and found.reply_text == "mine"


def test_a_run_without_output_is_not_an_answer():
    user = msg("user_message", content="hi", otid="o", run_id="run-1")
    assert answer_of_run([], user) is None
    newer = [msg("assistant_message", content="later turn", run_id="run-2"), msg("assistant_message", content="mine", run_id="run-1")]
    assert answer_of_run(newer, user)[0].reply_text == "mine"
    no_run = msg("user_message", content="hi", otid="o")
    newer = [msg("assistant_message", content="after next"), msg("user_message", content="next"), msg("assistant_message", content="mine")]
    assert answer_of_run(newer, no_run)[0].reply_text == "mine"


def test_viewer_totals_block_fields():
    totals = ViewerTotals(first_seen=0, last_seen=60, visits=2, support={"CNY": 30.0, "": 5})
    assert totals.as_block_fields()["total_support"] == "5 + 30 CNY"
    assert format_support({}) == "0"


# ---------------------------------------------------------------- streaming and coalesced turns


def test_a_streamed_turn_hands_over_the_text_as_it_comes_and_ends_like_a_plain_one():
    http = FakeLettaHttp()
    pieces: list[str] = []

    async def collect(delta: str) -> None:
        pieces.append(delta)

    async def scenario():
        turns = turns_with(http)
        streamed = await turns.send_turn("agent-1", [TurnMessage("t-1", "你好")], sender_name=None, on_text=collect)
        plain = await turns.send_turn("agent-1", [TurnMessage("t-2", "你好")], sender_name=None)
        return streamed, plain

    streamed, plain = asyncio.run(scenario())
    assert len(pieces) > 3 and "".join(pieces) == "reply to 你好. Bye!"
    # same text, the avatar call rebuilt from argument pieces, same flags (message ids differ by run)
    assert replace(streamed, message_ids=()) == replace(plain, message_ids=())
    assert streamed.message_ids == ("m-run-1",)
    assert json.loads(http.requests[0].content)["stream_tokens"] is True


def test_a_failing_text_sink_is_raised_as_is_not_as_a_letta_error():
    class SinkBroke(Exception):
        pass

    async def broken(delta: str) -> None:
        raise SinkBroke("redis is gone")

    async def scenario():
        await turns_with(FakeLettaHttp()).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None, on_text=broken)

    with pytest.raises(SinkBroke):
        asyncio.run(scenario())


def test_stream_chunks_of_several_messages_are_separated_and_errors_surface():
    turn = StreamedTurn()
    out = [turn.add(c) for c in [
        {"message_type": "assistant_message", "id": "a", "content": "One."},
        {"message_type": "assistant_message", "id": "b", "content": "Two"},
        {"message_type": "assistant_message", "id": "b", "content": "."},
        {"message_type": "stop_reason", "stop_reason": "end_turn"},
    ]]
    assert out == ["One.", "\nTwo", ".", ""]
    assert turn.result().reply_text == "One.\nTwo."
    failed = StreamedTurn()
    failed.add({"message_type": "error_message", "message": "LLM error"})
    with pytest.raises(LettaRetryable):
        failed.result()
    stopped = StreamedTurn()
    stopped.add({"message_type": "stop_reason", "stop_reason": "llm_api_error"})
    with pytest.raises(LettaUnavailable):
        stopped.result()


WORDS = {"message_type": "assistant_message", "id": "a", "content": "Hi there!"}


def call_piece(name: str | None, call_id: str = "c1", arguments: str = "") -> dict:
    return {"message_type": "tool_call_message", "tool_call": {"name": name, "tool_call_id": call_id, "arguments": arguments}}


@pytest.mark.parametrize("chunks, done_after", [
    ([WORDS, call_piece("set_expression")], 1),  # words, then a cue: done when the cue starts
    ([WORDS, call_piece(None), call_piece("set_expression")], 2),  # the call's name in a later piece
    ([call_piece("set_expression"), WORDS], None),  # cue first: the words end with the step
    ([WORDS, call_piece("stay_silent")], None),  # silence chosen after all: nothing to hand off
    ([WORDS], None),  # a plain reply ends with the step
    ([{**WORDS, "content": "  "}, call_piece("play_motion")], None),  # no words yet
    ([call_piece("play_motion", "c0"), WORDS, call_piece("remember_viewer_fact", "c2")], 2),
])
def test_a_streamed_step_knows_when_its_words_are_complete(chunks, done_after):
    turn = StreamedTurn()
    seen = []
    for chunk in chunks:
        turn.add(chunk)
        seen.append(turn.words_done)
    assert seen == [done_after is not None and i >= done_after for i in range(len(chunks))]


def test_words_done_is_called_once_as_soon_as_a_tool_call_follows_the_words():
    class WordsFirst(FakeLettaHttp):  # the model's usual shape: words, then two calls, then Letta runs them
        def __call__(self, request):
            self.requests.append(request)
            reply = [
                msg("assistant_message", id="m-1", content="好呀，我记住啦！"),
                msg("tool_call_message", tool_call={"name": "set_expression", "arguments": '{"expression": "happy"}', "tool_call_id": "c1"}),
                msg("tool_call_message", tool_call={"name": "remember_viewer_fact", "arguments": '{"fact": "likes cats"}', "tool_call_id": "c2"}),
                msg("tool_return_message", tool_call_id="c1", status="success", tool_return="Expression set: happy"),
                msg("tool_return_message", tool_call_id="c2", status="success", tool_return="Remembered"),
            ]
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse(token_chunks(reply)))

    events: list[str] = []

    async def on_text(delta: str) -> None:
        events.append(f"text:{delta}")

    async def on_words_done() -> None:
        events.append("words done")

    async def scenario():
        return await turns_with(WordsFirst()).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None,
                                                        on_text=on_text, on_words_done=on_words_done)

    result = asyncio.run(scenario())
    assert events.count("words done") == 1
    assert "".join(e[5:] for e in events[:events.index("words done")]) == "好呀，我记住啦！"  # every word first
    assert result.reply_text == "好呀，我记住啦！" and result.memory_updated and not result.unfinished


def cues_after_each(chunks: list[dict]) -> list[list[tuple[str, str]]]:
    turn = StreamedTurn()
    seen = []
    for chunk in chunks:
        turn.add(chunk)
        seen.append([(cue.call_id, cue.tool) for cue in turn.take_cues()])
    return seen


def test_an_avatar_call_is_handed_over_once_the_last_piece_of_its_arguments_has_come():
    reply = [msg("assistant_message", id="m-1", content="Hi!"),
             msg("tool_call_message", tool_call={"name": "set_expression", "tool_call_id": "c1",
                                                 "arguments": '{"expression": "happy", "intensity": 0.9}'})]
    chunks = token_chunks(reply)
    seen = cues_after_each(chunks)
    last_piece = max(i for i, c in enumerate(chunks) if c["message_type"] == "tool_call_message")
    assert [i for i, cues in enumerate(seen) if cues] == [last_piece]  # not a piece earlier, nor at the stop
    assert seen[last_piece] == [("c1", "set_expression")]


@pytest.mark.parametrize("chunks, expected", [
    # several calls in one response: each as soon as it is whole
    ([WORDS, call_piece("set_expression", "c1", '{"expression": "happy"}'), call_piece("play_motion", "c2", '{"motion":'),
      call_piece(None, "c2", ' "wave"}')], [[], [("c1", "set_expression")], [], [("c2", "play_motion")]]),
    # a call first, then the words
    ([call_piece("play_motion", "c1", '{"motion": "wave"}'), WORDS], [[("c1", "play_motion")], []]),
    # the name in a later piece than the arguments
    ([call_piece(None, "c1", '{"motion": "wave"}'), call_piece("play_motion", "c1")], [[], [("c1", "play_motion")]]),
    # not avatar calls, or arguments that never make a JSON object, or no id to mark it by
    ([call_piece("remember_viewer_fact", "c1", '{"fact": "x"}'), call_piece("set_expression", "c2", '{"expr'),
      WORDS, call_piece("set_expression", "", '{"expression": "happy"}')], [[], [], [], []]),
    # pieces after the arguments are whole hand nothing over twice
    ([call_piece("play_motion", "c1", '{"motion": "wave"}'), call_piece(None, "c1", ""),
      {"message_type": "stop_reason", "stop_reason": "end_turn"}], [[("c1", "play_motion")], [], []]),
])
def test_avatar_calls_are_handed_over_as_each_is_complete(chunks, expected):
    assert cues_after_each(chunks) == expected


def test_cues_are_handed_to_on_cue_while_the_step_streams_a_call_first_then_the_words():
    class CallFirst(FakeLettaHttp):  # a model that moves first and talks after
        def __call__(self, request):
            self.requests.append(request)
            reply = [
                msg("tool_call_message", tool_call={"name": "play_motion", "arguments": '{"motion": "wave"}', "tool_call_id": "c1"}),
                msg("tool_call_message", tool_call={"name": "set_expression", "arguments": '{"expression": "happy"}', "tool_call_id": "c2"}),
                msg("assistant_message", id="m-1", content="Hello!"),
                msg("tool_return_message", tool_call_id="c1", status="success", tool_return="Motion played: wave"),
                msg("tool_return_message", tool_call_id="c2", status="success", tool_return="Expression set: happy"),
            ]
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse(token_chunks(reply)))

    events: list[str] = []

    async def on_text(delta: str) -> None:
        events.append("text")

    async def on_cue(call) -> None:
        events.append(f"cue:{call.tool}:{call.call_id}")

    async def scenario():
        return await turns_with(CallFirst()).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None,
                                                        on_text=on_text, on_cue=on_cue)

    result = asyncio.run(scenario())
    assert [e for e in events if e != "text"] == ["cue:play_motion:c1", "cue:set_expression:c2"]
    assert events.index("cue:set_expression:c2") < events.index("text")  # both before the words
    assert [c.call_id for c in result.avatar_calls] == ["c1", "c2"]  # the ids FINISH compares with


def test_find_answered_tells_which_tasks_a_coalesced_turn_carried():
    http = FakeLettaHttp()

    async def scenario():
        turns = turns_with(http)
        await turns.send_turn("agent-1", [TurnMessage("a", "1"), TurnMessage("b", "2"), TurnMessage("c", "3")], sender_name=None)
        await turns.send_turn("agent-1", [TurnMessage("d", "4")], sender_name=None)
        return (await turns.find_answered("agent-1", ["a", "b", "c", "d"]),
                await turns.find_answered("agent-1", ["b", "c", "d"]),
                await turns.find_answered("agent-1", ["d", "e"]))

    from_a, from_b, from_d = asyncio.run(scenario())
    assert from_a.answered == ("a", "b", "c") and from_a.reply_text == "reply to 3. Bye!"
    assert from_b.answered == ("b", "c")
    assert from_d.answered == ("d",) and from_d.reply_text == "reply to 4. Bye!"
    body = json.loads(http.requests[0].content)
    assert [m["otid"] for m in body["messages"]] == [otid_for(t) for t in "abc"]  # one otid per task


def test_server_sent_events_are_read_to_the_end_and_an_error_event_is_retryable():
    body = b'data: {"a": 1}\n\n: a comment\nevent: error\ndata: {"detail":\ndata: "boom"}\n\ndata: [DONE]\n\n'
    response = httpx.Response(200, content=body)

    async def read():
        return [item async for item in sse_events(response)]

    assert asyncio.run(read()) == [(None, '{"a": 1}'), ("error", '{"detail":\n"boom"}'), (None, "[DONE]")]

    class ErrorStream(FakeLettaHttp):
        def __call__(self, request):
            self.requests.append(request)
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=b'event: error\ndata: {"message": "LLM down"}\n\n')

    async def send():
        async def ignore(delta: str) -> None:
            pass
        await turns_with(ErrorStream()).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None, on_text=ignore)

    with pytest.raises(LettaRetryable, match="LLM down"):
        asyncio.run(send())


# ---------------------------------------------------------------- one deadline, whole streams, settled runs

class RunsHttp(FakeLettaHttp):
    """Letta's run listing: `active` runs of the agent for the first `busy_polls` lookups."""

    def __init__(self, busy_polls: int, *, created_at: str | None = None):
        super().__init__()
        self.busy_polls = busy_polls
        self.created_at = created_at
        self.polls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.rstrip("/") != "/v1/runs":
            return super().__call__(request)
        self.requests.append(request)
        assert request.url.params["agent_id"] == "agent-1" and request.url.params["active"] == "true"
        self.polls += 1
        created = self.created_at or datetime.now(timezone.utc).isoformat()
        busy = self.polls <= self.busy_polls
        return httpx.Response(200, json=[{"id": "run-1", "agent_id": "agent-1", "status": "running",
                                          "created_at": created}] if busy else [])


def test_settling_waits_for_the_earlier_run_to_end_and_says_how_many_there_were():
    http = RunsHttp(busy_polls=3)
    assert asyncio.run(turns_with(http).settle_runs("agent-1")) == 1
    assert http.polls == 4  # polled until the run was over
    assert asyncio.run(turns_with(RunsHttp(busy_polls=0)).settle_runs("agent-1")) == 0


def test_a_run_still_in_flight_after_the_deadline_is_not_sent_over_and_an_orphan_does_not_count():
    async def settle(http, deadline):
        turns = turns_with(http)
        turns._deadline = deadline
        return await turns.settle_runs("agent-1")

    with pytest.raises(LettaUnavailable, match="still in flight"):
        asyncio.run(settle(RunsHttp(busy_polls=10**6), 0.6))
    orphan = RunsHttp(busy_polls=10**6, created_at=(datetime.now(timezone.utc) - timedelta(hours=2)).isoformat())
    assert asyncio.run(settle(orphan, 0.6)) == 0


class EndlessPings(FakeLettaHttp):
    """A hung model behind Letta: the stream sends keep-alive pings and nothing else."""

    def __call__(self, request):
        async def pings():
            while True:
                yield b'data: {"message_type": "ping"}\n\n'
                await asyncio.sleep(0.05)

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=pings())


class CutStream(FakeLettaHttp):
    """The stream ends mid-reply: some text, no stop reason, no [DONE]."""

    def __call__(self, request):
        chunks = [{"message_type": "assistant_message", "id": "m-1", "content": "Hello the"}]
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse(chunks))


@pytest.mark.parametrize("handler, error", [(EndlessPings, "longer than LETTA_TIMEOUT"), (CutStream, "before \\[DONE\\]")])
def test_a_stream_is_an_answer_only_when_it_ends_and_pings_do_not_extend_the_deadline(handler, error):
    async def ignore(delta: str) -> None:
        pass

    async def send():
        turns = turns_with(handler())
        turns._deadline = 0.5
        return await turns.send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None, on_text=ignore)

    with pytest.raises(LettaRetryable, match=error):
        asyncio.run(send())


def test_an_error_event_after_a_model_failure_is_letta_cannot_answer_now_not_a_retry():
    class ModelDown(FakeLettaHttp):  # what Letta 0.16.8 streams when the model fails mid-turn
        def __call__(self, request):
            body = (b'data: {"message_type": "stop_reason", "stop_reason": "llm_api_error"}\n\n'
                    b'event: error\ndata: {"error_type": "internal_error", "message": "An error occurred"}\n\n')
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    async def ignore(delta: str) -> None:
        pass

    async def send():
        await turns_with(ModelDown()).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None, on_text=ignore)

    with pytest.raises(LettaUnavailable, match="model failed mid-turn"):
        asyncio.run(send())


def test_an_error_event_naming_a_model_failure_is_unavailable_even_without_its_stop_reason():
    class RateLimited(FakeLettaHttp):  # the error event as Letta 0.16.8 sent it for a 429 of the model
        def __call__(self, request):
            body = b'event: error\ndata: {"message_type": "error_message", "error_type": "llm_rate_limit"}\n\n'
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    async def ignore(delta: str) -> None:
        pass

    async def send():
        await turns_with(RateLimited()).send_turn("agent-1", [TurnMessage("t-1", "hi")], sender_name=None, on_text=ignore)

    with pytest.raises(LettaUnavailable):
        asyncio.run(send())
