"""The scripted model server: the stand-in for the upstream LLM that Letta talks to in tests."""

from __future__ import annotations

import base64
import http.client
import json
import math
import re
import struct
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from stack import scripted_model
from stack.scripted_model import SCRIPTED_MODEL_ID, find_block, main, serve, validate_rules

# A system prompt shaped exactly as Letta 0.16.8 builds it: base prompt, then
# Memory._render_memory_blocks_standard (letta/schemas/memory.py), then the
# <memory_metadata> block (letta/prompts/prompt_generator.py).
LETTA_SYSTEM_PROMPT = """You are Aiko, a VTuber. Talk to your chat.

<memory_blocks>
The following memory blocks are currently engaged in your core memory unit:

<persona>
<description>
Who you are.
</description>
<metadata>
- read_only=true
- chars_current=23
- chars_limit=5000
</metadata>
<value>
I am Aiko, a fox VTuber.
</value>
</persona>

<human>
<description>
What you know about this viewer.
</description>
<metadata>
- chars_current=56
- chars_limit=2000
</metadata>
<value>
Viewer: kenji_42
Favourite game: Celeste
Pet: a cat called Mochi
</value>
</human>

</memory_blocks>

<memory_metadata>
- AGENT_ID: agent-0f6c
- CONVERSATION_ID: default
- System prompt last recompiled: 2025-01-15 09:00:00 AM UTC+0000
- 4 previous messages between you and the user are stored in recall memory
</memory_metadata>"""

SAVE_FACT_TOOL = {"type": "function", "function": {"name": "save_fact", "description": "Save a fact.",
                                                   "parameters": {"type": "object", "properties": {
                                                       "fact": {"type": "string"}}, "required": ["fact"]}}}


@pytest.fixture(scope="module")
def server():
    srv = serve("127.0.0.1", 0, rules=[{"name": "initial", "when": {"user_contains": "ping"}, "then": {"reply": "pong"}}])
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def base(server):
    url = f"http://127.0.0.1:{server.server_address[1]}"
    call(url, "POST", "/_script/reset", {})
    return url


def call(base, method, path, body=None, raw=None):
    """(status, parsed JSON) for one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def chat(base, messages, tools=None, **extra):
    body = {"model": SCRIPTED_MODEL_ID, "messages": messages, **extra}
    if tools:
        body["tools"] = tools
    status, payload = call(base, "POST", "/v1/chat/completions", body)
    assert status == 200, payload
    return payload


def stream(base, messages, tools=None, **extra):
    """The SSE events of one streaming chat request, parsed, with the final [DONE] as a string."""
    body = {"model": SCRIPTED_MODEL_ID, "messages": messages, "stream": True, **extra}
    if tools:
        body["tools"] = tools
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode() for line in response.read().split(b"\n\n") if line.strip()]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def put_rules(base, rules):
    status, payload = call(base, "PUT", "/_script/rules", rules)
    assert status == 200, payload


def user(text, **extra):
    return {"role": "user", "content": text, **extra}


def system(text=LETTA_SYSTEM_PROMPT):
    return {"role": "system", "content": text}


def tool_turn(name="save_fact", arguments='{"fact": "x"}', result='{"status": "OK", "message": "None"}'):
    return [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": result}]


def reply_text(payload):
    return payload["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- basics

def test_models_lists_scripted_and_embedding_model(base):
    status, payload = call(base, "GET", "/v1/models")
    assert status == 200 and payload["object"] == "list"
    by_id = {m["id"]: m for m in payload["data"]}
    assert by_id[SCRIPTED_MODEL_ID]["owned_by"] == "vtuber-letta-scripted"
    assert "text-embedding-3-small" in by_id
    assert call(base, "GET", "/health") == (200, {"status": "ok"})


def test_default_reply_echoes_user_with_usage(base):
    payload = chat(base, [system(), user("hello there")])
    assert reply_text(payload) == "(scripted) I heard: hello there"
    assert payload["object"] == "chat.completion" and payload["model"] == SCRIPTED_MODEL_ID
    assert payload["choices"][0]["finish_reason"] == "stop"
    usage = payload["usage"]
    assert usage["prompt_tokens"] > 10 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_default_after_tool_result_is_ok(base):
    payload = chat(base, [system(), user("remember x"), *tool_turn()], tools=[SAVE_FACT_TOOL])
    assert reply_text(payload) == "(scripted) ok"


def test_user_text_from_content_parts_and_packaged_json(base):
    parts = [{"type": "text", "text": "from parts"}]
    assert reply_text(chat(base, [system(), user(parts)])) == "(scripted) I heard: from parts"
    packed = json.dumps({"type": "user_message", "message": "packed hi", "time": "now", "name": "kenji"})
    heartbeat = json.dumps({"type": "heartbeat", "reason": "continue"})
    put_rules(base, [{"name": "who", "when": {}, "then": {"reply": "{name}: {user}"}}])
    assert reply_text(chat(base, [system(), user(packed), user(heartbeat)])) == "kenji: packed hi"


def test_user_regex_named_groups_and_safe_template(base):
    put_rules(base, [{"name": "intro", "when": {"user_regex": r"my name is (?P<who>\w+)"},
                      "then": {"reply": "Hi {who} ({name})! {missing}{{literal}} {0} {user.__class__}"}}])
    payload = chat(base, [system(), user("Hey, MY NAME IS Kenji!", name="kenji_42")])
    assert reply_text(payload) == "Hi Kenji (kenji_42)! {literal}  {user.__class__}"
    assert reply_text(chat(base, [system(), user("no name here")])) == "(scripted) I heard: no name here"


def test_developer_role_counts_as_system_prompt(base):
    # Letta sends "developer" instead of "system" for some OpenAI model families.
    put_rules(base, [{"name": "block", "when": {"system_contains": "<memory_blocks>"},
                      "then": {"reply_from_block": "persona"}}])
    payload = chat(base, [{"role": "developer", "content": LETTA_SYSTEM_PROMPT}, user("who are you")])
    assert reply_text(payload) == "I am Aiko, a fox VTuber."


def test_one_quiet_log_line_per_request(base, capsys):
    capsys.readouterr()
    put_rules(base, [{"name": "greet", "when": {}, "then": {"reply": "hi"}}])
    chat(base, [user("hello")])
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["scripted-model PUT /_script/rules model=- rule=- status=200",
                     f"scripted-model POST /v1/chat/completions model={SCRIPTED_MODEL_ID} rule=greet status=200"]


def test_system_contains_and_tools_offered_conditions(base):
    put_rules(base, [{"name": "needs-tool", "when": {"tools_offered": "save_fact"}, "then": {"reply": "tool ready"}},
                     {"name": "aiko", "when": {"system_contains": "You are Aiko"}, "then": {"reply": "aiko here"}}])
    assert reply_text(chat(base, [system(), user("x")], tools=[SAVE_FACT_TOOL])) == "tool ready"
    assert reply_text(chat(base, [system(), user("x")])) == "aiko here"
    assert reply_text(chat(base, [system("You are Bob."), user("x")])) == "(scripted) I heard: x"


def test_turn_contains_sees_only_what_the_request_adds_after_the_last_assistant_message(base):
    put_rules(base, [{"name": "noted", "when": {"turn_contains": "[note]"}, "then": {"reply": "saw the note"}}])
    assert reply_text(chat(base, [system("[note] in the system prompt"), user("x")])) == "(scripted) I heard: x"
    assert reply_text(chat(base, [system(), {"role": "system", "content": "[note] a"}, user("x")])) == "saw the note"
    old_note = [system(), {"role": "system", "content": "[note] old"}, user("x"), {"role": "assistant", "content": "ok"}]
    assert reply_text(chat(base, [*old_note, user("y")])) == "(scripted) I heard: y"
    assert reply_text(chat(base, [*old_note, {"role": "system", "content": "[note] new"}, user("y")])) == "saw the note"


# ---------------------------------------------------------------- tool calls

CALL_RULE = {"name": "save", "when": {"user_regex": r"remember (?P<fact>.+)"},
             "then": {"call_tool": "save_fact", "arguments": {"fact": "{fact}", "n": 3, "tags": ["{name}"]}}}


def test_call_tool_non_streaming(base):
    put_rules(base, [CALL_RULE])
    payload = chat(base, [system(), user("remember I like cats", name="kenji")], tools=[SAVE_FACT_TOOL])
    choice = payload["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (tool_call,) = choice["message"]["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["function"]["name"] == "save_fact"
    assert re.fullmatch(r"call_[0-9a-f]{8}_\d+", tool_call["id"])
    assert json.loads(tool_call["function"]["arguments"]) == {"fact": "I like cats", "n": 3, "tags": ["kenji"]}
    second = chat(base, [system(), user("remember more")], tools=[SAVE_FACT_TOOL])
    second_id = second["choices"][0]["message"]["tool_calls"][0]["id"]
    assert second_id.rsplit("_", 1) == [tool_call["id"].rsplit("_", 1)[0], str(int(tool_call["id"].rsplit("_", 1)[1]) + 1)]


def test_tool_call_ids_differ_between_server_runs(base):
    # Letta drops tool results whose id already occurs in the agent's context: a restarted
    # scripted model must not hand out the same ids again.
    other = serve("127.0.0.1", 0, rules=[CALL_RULE])
    try:
        other_base = f"http://127.0.0.1:{other.server_address[1]}"
        put_rules(base, [CALL_RULE])
        ids = {chat(url, [user("remember x")], tools=[SAVE_FACT_TOOL])["choices"][0]["message"]["tool_calls"][0]["id"]
               for url in (base, other_base)}
        assert len(ids) == 2
    finally:
        other.shutdown()
        other.server_close()


def test_call_tool_streaming_reassembles(base):
    put_rules(base, [CALL_RULE])
    events = stream(base, [system(), user("remember the moon is made of a very long list of cheeses")],
                    tools=[SAVE_FACT_TOOL], stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] > 0
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert len(calls) > 2  # arguments arrive in several fragments
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "save_fact"
    assert all("id" not in tc for tc in calls[1:])  # only the first delta names the call
    arguments = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert json.loads(arguments)["fact"] == "the moon is made of a very long list of cheeses"
    assert all(tc["index"] == 0 for tc in calls)


def test_after_tool_follow_up_and_no_loop(base):
    put_rules(base, [CALL_RULE, {"name": "saved", "when": {"after_tool": "save_fact"},
                                 "then": {"reply": "Saved! ({tool_result})"}},
                     {"name": "other-tool", "when": {"after_tool": "web_search"}, "then": {"reply": "searched"}}])
    messages = [system(), user("remember cats")] + tool_turn(result="OK")
    payload = chat(base, messages, tools=[SAVE_FACT_TOOL])
    assert reply_text(payload) == "Saved! (OK)"
    # The call_tool rule matches the user text but must not fire again after the tool result.
    put_rules(base, [CALL_RULE])
    assert reply_text(chat(base, messages, tools=[SAVE_FACT_TOOL])) == "(scripted) ok"
    put_rules(base, [{"name": "any", "when": {"after_tool": "*"}, "then": {"reply": "any tool"}}])
    assert reply_text(chat(base, messages, tools=[SAVE_FACT_TOOL])) == "any tool"
    assert reply_text(chat(base, [system(), user("hi")])) == "(scripted) I heard: hi"


def test_tool_not_offered_becomes_reply(base):
    put_rules(base, [CALL_RULE])
    payload = chat(base, [system(), user("remember cats")])
    assert reply_text(payload) == "(scripted model) tool save_fact not offered"
    assert payload["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------- memory blocks

def test_reply_from_block_reads_letta_rendering(base):
    put_rules(base, [
        {"name": "game", "when": {"user_contains": "game"},
         "then": {"reply_from_block": "human", "line_regex": r"favourite game: (?P<game>.+)",
                  "template": "You love {game}!"}},
        {"name": "pet", "when": {"user_contains": "pet"}, "then": {"reply_from_block": "human", "line_regex": "^Pet:"}},
        {"name": "whole", "when": {"user_contains": "who"}, "then": {"reply_from_block": "human"}},
        {"name": "nope", "when": {"user_contains": "nope"}, "then": {"reply_from_block": "scratchpad"}},
        {"name": "noline", "when": {"user_contains": "food"},
         "then": {"reply_from_block": "human", "line_regex": "food"}},
    ])
    assert reply_text(chat(base, [system(), user("what game do I like?")])) == "You love Celeste!"
    assert reply_text(chat(base, [system(), user("my pet?")])) == "Pet: a cat called Mochi"
    assert reply_text(chat(base, [system(), user("who am I")])) == (
        "Viewer: kenji_42\nFavourite game: Celeste\nPet: a cat called Mochi")
    assert reply_text(chat(base, [system(), user("nope")])) == "(scripted model) no block scratchpad in my prompt"
    assert "no line matching" in reply_text(chat(base, [system(), user("food")]))


def test_find_block_variants():
    assert find_block(LETTA_SYSTEM_PROMPT, "persona") == "I am Aiko, a fox VTuber."
    assert find_block("intro <human>\nplain value\n</human>", "human") == "plain value"
    line_numbered = ("<human>\n<description>\nd\n</description>\n<metadata>\n- chars_current=3\n</metadata>\n"
                     "<warning>\n# NOTE: Line numbers\n</warning>\n<value>\n1→ a\n2→ b\n</value>\n</human>")
    assert find_block(line_numbered, "human") == "a\nb"
    empty = "<human>\n<description>\n\n</description>\n<metadata>\n</metadata>\n<value>\n\n</value>\n</human>"
    assert find_block(empty, "human") == ""
    assert find_block(LETTA_SYSTEM_PROMPT, "missing") is None


# ---------------------------------------------------------------- rule bookkeeping

def test_times_limits_rule_use(base):
    put_rules(base, [{"name": "once", "times": 1, "when": {}, "then": {"reply": "first"}}])
    assert reply_text(chat(base, [user("a")])) == "first"
    assert reply_text(chat(base, [user("b")])) == "(scripted) I heard: b"
    assert call(base, "GET", "/_script/rules")[1]["used"] == [1]


def test_for_ms_ends_a_rule_that_long_after_it_was_set(base):
    put_rules(base, [{"name": "down", "for_ms": 400, "when": {}, "then": {"fail": {"status": 500}}}])
    status, _ = call(base, "POST", "/v1/chat/completions", {"model": SCRIPTED_MODEL_ID, "messages": [user("a")]})
    assert status == 500  # within the window: the fault, however often it is asked
    time.sleep(0.5)
    assert reply_text(chat(base, [user("b")])) == "(scripted) I heard: b"
    assert call(base, "GET", "/_script/rules")[1]["used"] == [1]


def test_control_api_replace_append_reset(base):
    assert reply_text(chat(base, [user("ping")])) == "pong"  # the rule loaded at start
    put_rules(base, [{"name": "old", "when": {}, "then": {"reply": "old"}}])
    assert reply_text(chat(base, [user("ping")])) == "old"
    status, payload = call(base, "POST", "/_script/rules", {"name": "new", "when": {}, "then": {"reply": "new"}})
    assert (status, payload) == (200, {"count": 2})
    assert reply_text(chat(base, [user("ping")])) == "new"  # prepended: newest wins
    status, _ = call(base, "POST", "/_script/rules", [{"name": "a", "when": {"user_contains": "zz"}, "then": {"reply": "a"}},
                                                      {"name": "b", "when": {}, "then": {"reply": "b"}}])
    assert [r["name"] for r in call(base, "GET", "/_script/rules")[1]["rules"]] == ["a", "b", "new", "old"]
    assert call(base, "POST", "/_script/reset", {})[0] == 200
    assert [r["name"] for r in call(base, "GET", "/_script/rules")[1]["rules"]] == ["initial"]
    assert call(base, "GET", "/_script/requests")[1]["requests"] == []
    assert reply_text(chat(base, [user("ping")])) == "pong"


def test_request_log_records_prompts_tools_and_answers(base):
    put_rules(base, [CALL_RULE])
    chat(base, [system("Viewer A likes tea"), user("hello")])
    chat(base, [system("Viewer B"), user("remember B likes coffee")], tools=[SAVE_FACT_TOOL])
    stream(base, [system("Viewer B"), user("bye")])
    requests = call(base, "GET", "/_script/requests")[1]["requests"]
    assert len(requests) == 3
    first, second, third = requests
    assert first["messages"][0]["content"] == "Viewer A likes tea" and first["rule"] == "(default)"
    assert first["response"] == {"reply": "(scripted) I heard: hello"} and first["stream"] is False
    assert second["tools"] == ["save_fact"] and second["rule"] == "save"
    assert second["response"]["tool_call"] == "save_fact"
    assert second["response"]["arguments"]["fact"] == "B likes coffee"
    assert third["stream"] is True and third["model"] == SCRIPTED_MODEL_ID
    # What the integration tests do: viewer B's prompts never carried viewer A's fact.
    assert not any("likes tea" in m["messages"][0]["content"] for m in requests if "Viewer B" in m["messages"][0]["content"])
    last = call(base, "GET", "/_script/requests?limit=1")[1]["requests"]
    assert last == [third]
    assert call(base, "GET", "/_script/requests?limit=x")[0] == 400


# ---------------------------------------------------------------- embeddings

def test_embeddings_deterministic_unit_vectors(base):
    status, payload = call(base, "POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b", "a"]})
    assert status == 200
    vectors = [d["embedding"] for d in payload["data"]]
    assert [d["index"] for d in payload["data"]] == [0, 1, 2]
    assert len(vectors[0]) == 1536 and vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert math.isclose(sum(v * v for v in vectors[1]), 1.0, rel_tol=1e-9)
    _, single = call(base, "POST", "/v1/embeddings", {"model": "m", "input": "a", "dimensions": 8})
    assert len(single["data"]) == 1 and len(single["data"][0]["embedding"]) == 8
    assert math.isclose(sum(v * v for v in single["data"][0]["embedding"]), 1.0, rel_tol=1e-9)
    _, packed = call(base, "POST", "/v1/embeddings", {"model": "m", "input": "a", "encoding_format": "base64"})
    decoded = struct.unpack("<1536f", base64.b64decode(packed["data"][0]["embedding"]))
    assert all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(decoded, vectors[0]))
    assert call(base, "POST", "/v1/embeddings", {"model": "m", "input": "a", "dimensions": "8"})[0] == 400


def test_embeddings_are_a_bag_of_words_so_vector_search_finds_shared_words():
    def cosine(a, b):
        va, vb = (scripted_model.embedding_vector(t, 1536) for t in (a, b))
        return sum(x * y for x, y in zip(va, vb))

    fact = "has a cat named Mochi"
    assert math.isclose(cosine(fact, "Has a CAT named mochi!"), 1.0, rel_tol=1e-9)  # case and punctuation blind
    assert cosine(fact, "cat Mochi") > cosine(fact, "plays the piano at night") + 0.3
    assert cosine("喜欢原神和猫", "原神") > cosine("喜欢原神和猫", "钢琴") + 0.3  # CJK counts by character
    assert scripted_model.embedding_vector("!!!", 8) != scripted_model.embedding_vector("???", 8)  # no words: hashed


# ---------------------------------------------------------------- errors

def test_bad_requests_get_openai_style_errors(base):
    status, payload = call(base, "POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and payload["error"]["type"] == "invalid_request_error"
    assert "JSON" in payload["error"]["message"]
    assert call(base, "POST", "/v1/chat/completions", {"model": "m"})[0] == 400
    assert call(base, "POST", "/v1/chat/completions", raw=b"[1, 2]")[0] == 400
    status, payload = call(base, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in payload


@pytest.mark.parametrize("rule, fragment", [
    ({"name": "x", "when": {}, "then": {}}, "rule[0].then"),
    ({"name": "x", "when": {"user_regex": "("}, "then": {"reply": "r"}}, "rule[0].when.user_regex"),
    ({"name": "x", "when": {"user_says": "hi"}, "then": {"reply": "r"}}, "rule[0].when.user_says"),
    ({"name": "", "when": {}, "then": {"reply": "r"}}, "rule[0].name"),
    ({"name": "x", "then": {"reply": "r", "call_tool": "t"}}, "exactly one"),
    ({"name": "x", "then": {"reply": "r", "tokens_per_second": 0}}, "tokens_per_second"),
    ({"name": "x", "then": {"reply": "r"}, "times": -1}, "rule[0].times"),
    ({"name": "x", "then": {"reply": "r", "template": "t"}}, "rule[0].then.template: not used with reply"),
    ({"name": "x", "then": {"call_tool": "t", "arguments": "{}"}}, "rule[0].then.arguments: must be an object"),
    ({"name": "x", "priority": 1, "then": {"reply": "r"}}, "rule[0].priority: unknown key"),
    ({"when": {}, "then": {"reply": "r"}}, "rule[0].name"),
    ({"name": "x", "when": {}}, "rule[0].then: must be an object"),
    ("just a string", "rule[0]: must be an object"),
])
def test_bad_rules_rejected_with_reason(base, rule, fragment):
    status, payload = call(base, "PUT", "/_script/rules", [rule])
    assert status == 400 and fragment in payload["error"]["message"]
    assert [r["name"] for r in call(base, "GET", "/_script/rules")[1]["rules"]] == ["initial"]  # unchanged


def test_rules_file_validated_at_start(tmp_path, capsys):
    bad = tmp_path / "rules.json"
    bad.write_text(json.dumps([{"name": "ok", "then": {"reply": "r"}}, {"name": "bad", "then": {"call_tool": ""}}]))
    assert main(["--port", "0", "--rules", str(bad)]) == 2
    assert "rule[1].then.call_tool" in capsys.readouterr().err
    assert validate_rules({"rules": [{"name": "ok", "then": {"reply": "r"}}]})[0]["name"] == "ok"


def test_port_in_use_is_a_clear_error(server, capsys):
    assert main(["--port", str(server.server_address[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


# ---------------------------------------------------------------- streaming text and pacing

def test_streamed_reply_one_token_per_chunk_with_pacing(base):
    text = "one two three four five six seven eight nine ten"
    put_rules(base, [{"name": "paced", "when": {}, "then": {"reply": text, "tokens_per_second": 200}}])
    started = time.monotonic()
    events = stream(base, [user("go")])
    elapsed = time.monotonic() - started
    chunks = events[:-1]
    assert events[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(contents) == 10 and "".join(contents) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert elapsed >= 0.9 * 10 / 200  # loose lower bound only


def test_keep_alive_survives_streaming_and_plain_requests(server, base):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    body = {"model": SCRIPTED_MODEL_ID, "messages": [user("hi")]}
    for stream_flag in (True, False, True, False):
        connection.request("POST", "/v1/chat/completions", json.dumps(dict(body, stream=stream_flag)),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        assert response.status == 200
        if stream_flag:
            assert response.getheader("Transfer-Encoding") == "chunked" and data.endswith(b"data: [DONE]\n\n")
        else:
            assert reply_text(json.loads(data)) == "(scripted) I heard: hi"
    connection.request("GET", "/health")
    assert json.loads(connection.getresponse().read()) == {"status": "ok"}
    connection.close()


def test_parallel_burst_of_connections_is_served(base):
    # Letta runs many agent turns at once; a small listen backlog made some connections fail.
    with ThreadPoolExecutor(max_workers=40) as pool:
        replies = list(pool.map(lambda i: reply_text(chat(base, [user(f"n{i}")])), range(40)))
    assert replies == [f"(scripted) I heard: n{i}" for i in range(40)]


# ---------------------------------------------------------------- the real client Letta uses

def test_openai_sdk_round_trip(base):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=base + "/v1", api_key="not-a-secret", max_retries=0)
    assert SCRIPTED_MODEL_ID in [m.id for m in client.models.list()]
    put_rules(base, [CALL_RULE])
    completion = client.chat.completions.create(model=SCRIPTED_MODEL_ID, messages=[user("remember tea")],
                                                tools=[SAVE_FACT_TOOL], tool_choice="auto", temperature=0.7)
    assert json.loads(completion.choices[0].message.tool_calls[0].function.arguments)["fact"] == "tea"
    events = list(client.chat.completions.create(model=SCRIPTED_MODEL_ID, messages=[user("hello sdk")], stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == "(scripted) I heard: hello sdk"
    assert events[-1].usage.total_tokens > 0
    vector = client.embeddings.create(model="text-embedding-3-small", input="a").data[0].embedding  # base64 on the wire
    assert len(vector) == 1536 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-5)


def test_module_constant_name_is_stable():
    assert scripted_model.SCRIPTED_MODEL_ID == "scripted-vtuber"


# ---------------------------------------------------------------- text and tool calls in one response

EXPRESSION_TOOL = {"type": "function", "function": {"name": "set_expression", "description": "Change the face.",
                                                    "parameters": {"type": "object", "properties": {
                                                        "expression": {"type": "string"}}}}}
BOTH_TOOLS = [SAVE_FACT_TOOL, EXPRESSION_TOOL]
TWO_CALLS = [{"name": "save_fact", "arguments": {"fact": "{name} likes {thing}", "tags": ["{thing}", 2]}},
             {"name": "set_expression", "arguments": {"expression": "happy"}}]
CALL_ID = re.compile(r"call_[0-9a-f]{8}_\d+")


def text_and_calls_rule(text_position=None, **then):
    then = {"reply": "Oh, {thing}? Noted, {name}!", "tool_calls": TWO_CALLS, **then}
    if text_position:
        then["text_position"] = text_position
    return {"name": "both", "when": {"user_regex": r"I like (?P<thing>.+)"}, "then": then}


def assemble(events):
    """Re-assembles chat.completion.chunk events the way OpenAI clients do (openai's
    ChatCompletionStreamState): content deltas joined, tool-call deltas merged by index,
    id/type/name taken from the delta that carries them, argument pieces joined."""
    content, calls, finish = None, {}, None
    for event in events:
        if event == "[DONE]" or not event["choices"]:
            continue
        (choice,) = event["choices"]
        delta = choice["delta"]
        if delta.get("content") is not None:
            content = (content or "") + delta["content"]
        for part in delta.get("tool_calls") or []:
            call = calls.setdefault(part["index"], {"id": None, "type": None, "name": "", "arguments": ""})
            call["id"] = part.get("id") or call["id"]
            call["type"] = part.get("type") or call["type"]
            call["name"] += (part.get("function") or {}).get("name") or ""
            call["arguments"] += (part.get("function") or {}).get("arguments") or ""
        finish = choice["finish_reason"] or finish
    return {"content": content, "tool_calls": [calls[index] for index in sorted(calls)], "finish_reason": finish}


def delta_kinds(events):
    """'text' / 'call' per chunk that carries content or tool-call deltas, in stream order."""
    kinds = []
    for event in events:
        if event != "[DONE]" and event["choices"]:
            delta = event["choices"][0]["delta"]
            kinds += ["text"] * bool(delta.get("content")) + ["call"] * bool(delta.get("tool_calls"))
    return kinds


def test_reply_with_tool_calls_non_streaming(base):
    put_rules(base, [text_and_calls_rule()])
    payload = chat(base, [system(), user("I like tea", name="kenji")], tools=BOTH_TOOLS)
    (choice,) = payload["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Oh, tea? Noted, kenji!"
    first, second = choice["message"]["tool_calls"]
    assert CALL_ID.fullmatch(first["id"]) and CALL_ID.fullmatch(second["id"]) and first["id"] != second["id"]
    assert (first["type"], first["function"]["name"], second["function"]["name"]) == ("function", "save_fact", "set_expression")
    assert json.loads(first["function"]["arguments"]) == {"fact": "kenji likes tea", "tags": ["tea", 2]}
    assert json.loads(second["function"]["arguments"]) == {"expression": "happy"}
    (logged,) = call(base, "GET", "/_script/requests")[1]["requests"]
    assert logged["response"] == {"reply": "Oh, tea? Noted, kenji!", "tool_calls": [
        {"name": "save_fact", "id": first["id"], "arguments": {"fact": "kenji likes tea", "tags": ["tea", 2]}},
        {"name": "set_expression", "id": second["id"], "arguments": {"expression": "happy"}}]}


@pytest.mark.parametrize("text_position, order", [(None, ["text", "call"]), ("before", ["text", "call"]),
                                                  ("after", ["call", "text"])])
def test_reply_with_tool_calls_streamed(base, text_position, order):
    put_rules(base, [text_and_calls_rule(text_position)])
    events = stream(base, [system(), user("I like green tea", name="kenji")], tools=BOTH_TOOLS,
                    stream_options={"include_usage": True})
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] > 0
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    kinds = delta_kinds(events)
    assert [kind for i, kind in enumerate(kinds) if i == 0 or kinds[i - 1] != kind] == order  # two runs, in order
    assert kinds.count("text") == len("Oh, green tea? Noted, kenji!".split())
    whole = assemble(events)
    assert whole["content"] == "Oh, green tea? Noted, kenji!" and whole["finish_reason"] == "tool_calls"
    saved, face = whole["tool_calls"]
    assert (saved["name"], face["name"]) == ("save_fact", "set_expression")
    assert saved["type"] == face["type"] == "function" and saved["id"] != face["id"]
    assert json.loads(saved["arguments"]) == {"fact": "kenji likes green tea", "tags": ["green tea", 2]}
    assert json.loads(face["arguments"]) == {"expression": "happy"}
    parts = [tc for e in events[:-2] for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    for index, assembled in enumerate(whole["tool_calls"]):
        own = [tc for tc in parts if tc["index"] == index]
        assert own[0] == {"index": index, "id": assembled["id"], "type": "function",
                          "function": {"name": assembled["name"], "arguments": ""}}
        assert len(own) > 3 and all(set(tc) == {"index", "function"} for tc in own[1:])  # pieces, unnamed
    assert [tc["index"] for tc in parts] == sorted(tc["index"] for tc in parts)  # one call after the other


def test_tool_calls_without_text(base):
    put_rules(base, [{"name": "calls", "when": {}, "then": {"tool_calls": TWO_CALLS}}])
    message = chat(base, [user("I like tea")], tools=BOTH_TOOLS)["choices"][0]["message"]
    assert message["content"] is None and len(message["tool_calls"]) == 2
    events = stream(base, [user("I like tea")], tools=BOTH_TOOLS)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert "text" not in delta_kinds(events)
    whole = assemble(events)
    assert whole["content"] is None and [c["name"] for c in whole["tool_calls"]] == ["save_fact", "set_expression"]
    single = {"name": "one", "when": {}, "then": {"tool_calls": [{"name": "set_expression"}]}}
    put_rules(base, [single])
    (only,) = chat(base, [user("x")], tools=BOTH_TOOLS)["choices"][0]["message"]["tool_calls"]
    assert json.loads(only["function"]["arguments"]) == {}


def test_reply_from_block_with_tool_calls(base):
    put_rules(base, [{"name": "block-and-call", "when": {}, "then": {
        "reply_from_block": "human", "line_regex": r"pet: (?P<pet>.+)", "template": "Say hi to {pet}!",
        "tool_calls": [{"name": "set_expression", "arguments": {"expression": "{pet}"}}]}}])
    message = chat(base, [system(), user("hello")], tools=BOTH_TOOLS)["choices"][0]["message"]
    assert message["content"] == "Say hi to a cat called Mochi!"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"expression": "a cat called Mochi"}


def test_tool_calls_for_tools_not_offered_become_text(base):
    put_rules(base, [text_and_calls_rule()])
    payload = chat(base, [user("I like tea")], tools=[EXPRESSION_TOOL])
    assert reply_text(payload) == "(scripted model) tool save_fact not offered"
    assert payload["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in payload["choices"][0]["message"]


def test_call_tool_stream_keeps_its_shape(base):
    # The original form: 16-character fragments, unpaced even with tokens_per_second.
    put_rules(base, [dict(CALL_RULE, then=dict(CALL_RULE["then"], tokens_per_second=1))])
    started = time.monotonic()
    events = stream(base, [user("remember " + "x" * 40)], tools=[SAVE_FACT_TOOL])
    assert time.monotonic() - started < 2
    pieces = [tc["function"]["arguments"] for e in events[:-1] for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    arguments = json.dumps({"fact": "x" * 40, "n": 3, "tags": [""]})
    assert pieces == [""] + [arguments[i:i + 16] for i in range(0, len(arguments), 16)]


def test_tokens_per_second_paces_text_and_argument_pieces(base):
    put_rules(base, [text_and_calls_rule(tokens_per_second=100)])
    units = len("Oh, tea? Noted, kenji!".split()) + sum(
        len(scripted_model.argument_pieces(json.dumps(a)))
        for a in ({"fact": "kenji likes tea", "tags": ["tea", 2]}, {"expression": "happy"}))
    assert units > 15
    for send in (chat, stream):
        started = time.monotonic()
        send(base, [user("I like tea", name="kenji")], tools=BOTH_TOOLS)
        elapsed = time.monotonic() - started
        assert 0.9 * units / 100 <= elapsed < units / 100 + 2, (send.__name__, elapsed)


@pytest.mark.parametrize("arguments", [
    '{"fact": "kenji likes tea", "n": 3}', '{"a":"b"}', "{}", '{"fact": "caf\\u00e9 \\"quoted\\" \\\\ back"}',
    json.dumps({"long": "x" * 50, "nested": {"list": [1, 2.5, None, True]}, "spaces": "a   b\n"}),
])
def test_argument_pieces_are_token_sized_and_join_back(arguments):
    pieces = scripted_model.argument_pieces(arguments)
    assert "".join(pieces) == arguments and all(pieces)
    assert len(pieces) >= min(2, len(arguments) - 2) and max(len(p.strip()) for p in pieces) <= 8


# ---------------------------------------------------------------- faults

def raw_chat(base, body, timeout=10):
    """(response, connection) for one chat request over http.client, so headers and broken reads show."""
    host, port = base.rsplit("/", 1)[-1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    connection.request("POST", "/v1/chat/completions", json.dumps({"model": SCRIPTED_MODEL_ID, **body}),
                       {"Content-Type": "application/json"})
    return connection.getresponse(), connection


@pytest.mark.parametrize("status, kind, code", [
    (400, "invalid_request_error", None), (401, "invalid_request_error", "invalid_api_key"),
    (429, "requests", "rate_limit_exceeded"), (500, "server_error", None), (503, "server_error", None)])
@pytest.mark.parametrize("streamed", [False, True])
def test_fail_answers_openai_style_errors(base, status, kind, code, streamed):
    put_rules(base, [{"name": "down", "when": {}, "then": {"fail": {"status": status, "message": "no, {name}"}}}])
    response, connection = raw_chat(base, {"messages": [user("hi", name="kenji")], "stream": streamed})
    body = json.loads(response.read())
    assert response.status == status and response.getheader("Content-Type") == "application/json"
    assert body == {"error": {"message": "no, kenji", "type": kind, "param": None, "code": code}}
    assert response.getheader("Retry-After") == ("1" if status == 429 else None)
    connection.request("GET", "/health")  # an error is an answer: the connection stays usable
    assert json.loads(connection.getresponse().read()) == {"status": "ok"}
    connection.close()


def test_fail_defaults_overrides_and_times(base):
    put_rules(base, [{"name": "full", "times": 1, "when": {}, "then": {"fail": {"status": 400, "code": "context_length_exceeded"}}},
                     {"name": "auth", "times": 2, "when": {}, "then": {"fail": {"status": 401}}}])
    status, payload = call(base, "POST", "/v1/chat/completions", {"model": SCRIPTED_MODEL_ID, "messages": [user("a")]})
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    assert payload["error"]["type"] == "invalid_request_error" and "scripted fault" in payload["error"]["message"]
    for _ in range(2):
        status, payload = call(base, "POST", "/v1/chat/completions", {"model": SCRIPTED_MODEL_ID, "messages": [user("a")]})
        assert (status, payload["error"]["code"]) == (401, "invalid_api_key")
    assert reply_text(chat(base, [user("a")])) == "(scripted) I heard: a"  # times used up: back to normal
    assert call(base, "GET", "/_script/rules")[1]["used"] == [1, 2]


@pytest.mark.parametrize("streamed", [False, True])
def test_stall_ms_holds_back_even_the_headers(base, streamed):
    put_rules(base, [{"name": "stall", "when": {}, "then": {"reply": "late", "stall_ms": 400}}])
    started = time.monotonic()
    response, connection = raw_chat(base, {"messages": [user("hi")], "stream": streamed})
    headers_after = time.monotonic() - started
    data = response.read()
    connection.close()
    assert 0.38 <= headers_after < 3, headers_after
    assert b"late" in data
    assert call(base, "GET", "/_script/requests")[1]["requests"][0]["fault"] == {"stall_ms": 400}


def test_stalled_request_is_logged_while_it_waits(base):
    put_rules(base, [{"name": "stall", "when": {}, "then": {"fail": {"status": 503}, "stall_ms": 1500}}])
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(call, base, "POST", "/v1/chat/completions", {"model": SCRIPTED_MODEL_ID, "messages": [user("a")]})
        deadline = time.monotonic() + 1.0
        while not call(base, "GET", "/_script/requests")[1]["requests"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert call(base, "GET", "/_script/requests")[1]["requests"] and not pending.done()
        assert pending.result(timeout=10)[0] == 503


def read_cut_stream(response):
    """The SSE data events a cut stream delivered before the read broke, and whether it broke."""
    data, broken = b"", False
    try:
        while chunk := response.read1(65536):
            data += chunk
    except http.client.IncompleteRead as exc:
        data, broken = data + exc.partial, True
    events = [line for line in data.split(b"\n\n") if line.strip()]
    return [json.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]" for line in events], broken


@pytest.mark.parametrize("cut, expected_chunks", [(0, 0), (3, 3), (1000, None)])
def test_cut_after_chunks_breaks_the_stream(base, cut, expected_chunks):
    put_rules(base, [{"name": "cut", "when": {}, "then": {"reply": "one two three four five six", "cut_after_chunks": cut}}])
    response, connection = raw_chat(base, {"messages": [user("hi")], "stream": True,
                                           "stream_options": {"include_usage": True}})
    assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
    events, broken = read_cut_stream(response)
    connection.close()
    assert broken, "the client must see an incomplete chunked body"
    assert "[DONE]" not in events and all(e["choices"] and e["choices"][0]["finish_reason"] is None for e in events)
    assert len(events) == (expected_chunks if expected_chunks is not None else 1 + 6)  # role chunk + 6 tokens
    assert assemble(events)["finish_reason"] is None  # what an OpenAI client joins is no finished answer


def test_cut_stream_of_tool_calls_leaves_arguments_unfinished(base):
    put_rules(base, [{"name": "cut", "when": {}, "then": {"tool_calls": TWO_CALLS, "cut_after_chunks": 4}}])
    response, connection = raw_chat(base, {"messages": [user("I like tea")], "tools": BOTH_TOOLS, "stream": True})
    events, broken = read_cut_stream(response)
    connection.close()
    assert broken and len(events) == 4
    (partial,) = assemble(events)["tool_calls"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(partial["arguments"])


def test_cut_plain_request_gets_no_answer(base):
    put_rules(base, [{"name": "cut", "times": 1, "when": {}, "then": {"reply": "never", "cut_after_chunks": 2}}])
    with pytest.raises(http.client.RemoteDisconnected):
        raw_chat(base, {"messages": [user("hi")]})
    assert reply_text(chat(base, [user("again")])) == "(scripted) I heard: again"


# ---------------------------------------------------------------- counting at the endpoint

def test_request_log_and_stats_count_model_calls(base):
    put_rules(base, [{"name": "down", "times": 1, "when": {"user_contains": "fail"}, "then": {"fail": {"status": 429}}},
                     {"name": "cut", "times": 1, "when": {"user_contains": "cut"}, "then": {"reply": "x", "cut_after_chunks": 1}},
                     text_and_calls_rule()])
    assert call(base, "GET", "/_script/stats")[1] == {"chat_requests": 0, "streamed": 0, "by_rule": {}, "by_fault": {}}
    chat(base, [system(), user("I like tea")], tools=BOTH_TOOLS, parallel_tool_calls=False, tool_choice="auto")
    stream(base, [user("hello")], parallel_tool_calls=True)
    assert call(base, "POST", "/v1/chat/completions", {"model": SCRIPTED_MODEL_ID, "messages": [user("fail")]})[0] == 429
    response, connection = raw_chat(base, {"messages": [user("cut")], "stream": True})
    assert read_cut_stream(response)[1]
    connection.close()
    first, second, third, fourth = call(base, "GET", "/_script/requests")[1]["requests"]
    assert (first["rule"], first["stream"], first["message_count"], first["tools"]) == ("both", False, 2, ["save_fact", "set_expression"])
    assert (first["parallel_tool_calls_sent"], first["parallel_tool_calls"], first["tool_choice"]) == (True, False, "auto")
    assert first["fault"] is None
    assert (second["rule"], second["stream"], second["message_count"], second["tools"]) == ("(default)", True, 1, [])
    assert (second["parallel_tool_calls_sent"], second["parallel_tool_calls"]) == (True, True)
    assert (third["parallel_tool_calls_sent"], third["parallel_tool_calls"]) == (False, None)
    assert third["fault"] == {"fail": {"status": 429}} and third["response"]["fail"]["status"] == 429
    assert fourth["fault"] == {"cut_after_chunks": 1} and fourth["stream"] is True
    assert call(base, "GET", "/_script/stats")[1] == {
        "chat_requests": 4, "streamed": 2, "by_rule": {"both": 1, "(default)": 1, "down": 1, "cut": 1},
        "by_fault": {"fail_429": 1, "cut_after_chunks": 1}}
    put_rules(base, [])  # replacing rules does not forget what was counted
    assert call(base, "GET", "/_script/stats")[1]["chat_requests"] == 4
    call(base, "POST", "/_script/reset", {})
    assert call(base, "GET", "/_script/stats")[1] == {"chat_requests": 0, "streamed": 0, "by_rule": {}, "by_fault": {}}


def test_bad_chat_requests_are_not_counted(base):
    assert call(base, "POST", "/v1/chat/completions", {"model": "m"})[0] == 400
    assert call(base, "GET", "/_script/stats")[1]["chat_requests"] == 0


# ---------------------------------------------------------------- validation of the new forms

@pytest.mark.parametrize("then, fragment", [
    ({"reply": "r", "tool_calls": []}, "rule[0].then.tool_calls: must be a non-empty list"),
    ({"tool_calls": {"name": "t"}}, "rule[0].then.tool_calls: must be a non-empty list"),
    ({"tool_calls": ["save_fact"]}, "rule[0].then.tool_calls[0]: must be an object"),
    ({"tool_calls": [{"name": "a"}, {"arguments": {}}]}, "rule[0].then.tool_calls[1].name: is required"),
    ({"tool_calls": [{"name": ""}]}, "rule[0].then.tool_calls[0].name: must be a non-empty string"),
    ({"tool_calls": [{"name": "a", "arguments": "{}"}]}, "rule[0].then.tool_calls[0].arguments: must be an object"),
    ({"tool_calls": [{"name": "a", "args": {}}]}, "rule[0].then.tool_calls[0].args: unknown key"),
    ({"call_tool": "a", "tool_calls": [{"name": "a"}]}, "exactly one"),
    ({"reply": "r", "reply_from_block": "human", "tool_calls": [{"name": "a"}]}, "exactly one"),
    ({"reply": "r", "fail": {"status": 500}}, "exactly one"),
    ({"call_tool": "a", "text_position": "after"}, "rule[0].then.text_position: not used with call_tool"),
    ({"tool_calls": [{"name": "a"}], "text_position": "after"}, "rule[0].then.text_position: only used when"),
    ({"reply": "r", "tool_calls": [{"name": "a"}], "text_position": "middle"}, 'must be "before" or "after"'),
    ({"reply": "r", "tool_calls": [{"name": "a"}], "template": "t"}, "rule[0].then.template: not used with reply+tool_calls"),
    ({"fail": 500}, "rule[0].then.fail: must be an object"),
    ({"fail": {}}, "rule[0].then.fail.status: is required"),
    ({"fail": {"status": 418}}, "rule[0].then.fail.status: must be one of [400, 401"),
    ({"fail": {"status": "500"}}, "rule[0].then.fail.status: must be one of"),
    ({"fail": {"status": 500, "message": 1}}, "rule[0].then.fail.message: must be a string"),
    ({"fail": {"status": 500, "retry": True}}, "rule[0].then.fail.retry: unknown key"),
    ({"fail": {"status": 500}, "cut_after_chunks": 1}, "rule[0].then.cut_after_chunks: not used with fail"),
    ({"fail": {"status": 500}, "tokens_per_second": 5}, "rule[0].then.tokens_per_second: not used with fail"),
    ({"reply": "r", "stall_ms": -1}, "rule[0].then.stall_ms: must be a non-negative integer"),
    ({"reply": "r", "stall_ms": 1.5}, "rule[0].then.stall_ms: must be a non-negative integer"),
    ({"reply": "r", "stall_ms": 10, "delay_ms": 10}, "rule[0].then.stall_ms: is an alias of delay_ms"),
    ({"reply": "r", "cut_after_chunks": True}, "rule[0].then.cut_after_chunks: must be a non-negative integer"),
])
def test_bad_new_rule_forms_rejected_with_reason(base, then, fragment):
    status, payload = call(base, "PUT", "/_script/rules", [{"name": "x", "then": then}])
    assert status == 400 and fragment in payload["error"]["message"], payload
    assert [r["name"] for r in call(base, "GET", "/_script/rules")[1]["rules"]] == ["initial"]


def test_new_forms_accepted():
    rules = validate_rules([
        {"name": "a", "then": {"tool_calls": [{"name": "t", "arguments": {"x": 1}}], "tokens_per_second": 5,
                               "stall_ms": 0, "cut_after_chunks": 2}},
        {"name": "b", "then": {"reply": "", "tool_calls": [{"name": "t"}], "text_position": "before"}},
        {"name": "c", "times": 3, "then": {"fail": {"status": 503, "message": "", "type": "x", "code": None}, "delay_ms": 5}},
        {"name": "d", "then": {"reply_from_block": "human", "line_regex": "x", "tool_calls": [{"name": "t"}]}}])
    assert [r["name"] for r in rules] == ["a", "b", "c", "d"]


# ---------------------------------------------------------------- the test-side client

def test_scripted_client_helpers(server, base):
    from tests.integration.scripted import ScriptedModel, ScriptedModelError, fail_rule, tool_calls_rule

    model = ScriptedModel(server.server_address[1])
    model.set_rules()
    assert model.reply_with_tools("both", "Hi {who}!", ("save_fact", {"fact": "name is {who}"}),
                                  {"name": "set_expression", "arguments": {"expression": "happy"}},
                                  when={"user_regex": r"I am (?P<who>\w+)"}, text_position="after") == 1
    message = chat(base, [user("I am Kenji")], tools=BOTH_TOOLS)["choices"][0]["message"]
    assert message["content"] == "Hi Kenji!"
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"fact": "name is Kenji"},
                                                                                         {"expression": "happy"}]
    assert delta_kinds(stream(base, [user("I am Kenji")], tools=BOTH_TOOLS))[0] == "call"  # text after
    model.fail("down", 503, "try later")
    status, payload = call(base, "POST", "/v1/chat/completions", {"model": SCRIPTED_MODEL_ID, "messages": [user("x")]})
    assert (status, payload["error"]["message"]) == (503, "try later")
    assert reply_text(chat(base, [user("y")])) == "(scripted) I heard: y"  # fail is once by default
    model.cut_stream("cut", 2, {"reply": "a b c d"})
    response, connection = raw_chat(base, {"messages": [user("z")], "stream": True})
    events, broken = read_cut_stream(response)
    connection.close()
    assert broken and len(events) == 2
    assert model.chat_requests() == 5 and model.chat_requests("both") == 2 and model.chat_requests("nope") == 0
    assert model.stats()["by_fault"] == {"fail_503": 1, "cut_after_chunks": 1}
    assert tool_calls_rule("t", None, ("a", {})) == {"name": "t", "when": {}, "then": {"tool_calls": [{"name": "a", "arguments": {}}]}}
    assert fail_rule("f", 429, times=None, code="insufficient_quota", stall_ms=5) == {
        "name": "f", "when": {}, "then": {"fail": {"status": 429, "code": "insufficient_quota"}, "stall_ms": 5}}
    with pytest.raises(ScriptedModelError, match="text_position: only used when"):
        model.reply_with_tools("bad", None, ("a", {}), text_position="after")
    with pytest.raises(ValueError):
        tool_calls_rule("none", "text")


# ---------------------------------------------------------------- the real client, new forms

def test_openai_sdk_parses_new_forms(base):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=base + "/v1", api_key="not-a-secret", max_retries=0)
    messages = [user("I like tea", name="kenji")]
    for position in ("before", "after"):
        put_rules(base, [text_and_calls_rule(position)])
        completion = client.chat.completions.create(model=SCRIPTED_MODEL_ID, messages=messages, tools=BOTH_TOOLS)
        message = completion.choices[0].message
        assert message.content == "Oh, tea? Noted, kenji!" and completion.choices[0].finish_reason == "tool_calls"
        assert [c.function.name for c in message.tool_calls] == ["save_fact", "set_expression"]
        with client.chat.completions.stream(model=SCRIPTED_MODEL_ID, messages=messages, tools=BOTH_TOOLS) as events:
            for _ in events:
                pass
            final = events.get_final_completion()
        streamed = final.choices[0].message
        assert streamed.content == "Oh, tea? Noted, kenji!" and final.choices[0].finish_reason == "tool_calls"
        assert [json.loads(c.function.arguments) for c in streamed.tool_calls] == [
            {"fact": "kenji likes tea", "tags": ["tea", 2]}, {"expression": "happy"}]
        assert len({c.id for c in streamed.tool_calls}) == 2
    for status, error in ((400, openai.BadRequestError), (401, openai.AuthenticationError),
                          (429, openai.RateLimitError), (500, openai.InternalServerError), (503, openai.InternalServerError)):
        put_rules(base, [{"name": "down", "when": {}, "then": {"fail": {"status": status}}}])
        for stream_flag in (False, True):
            with pytest.raises(error) as raised:
                client.chat.completions.create(model=SCRIPTED_MODEL_ID, messages=messages, stream=stream_flag)
            assert raised.value.status_code == status and raised.value.body["type"] == FAULT_TYPES[status]
    put_rules(base, [{"name": "cut", "when": {}, "then": {"reply": "one two three", "cut_after_chunks": 2}}])
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=SCRIPTED_MODEL_ID, messages=messages)
    with pytest.raises(Exception) as raised:  # httpx.RemoteProtocolError, which Letta maps to LLMConnectionError
        list(client.chat.completions.create(model=SCRIPTED_MODEL_ID, messages=messages, stream=True))
    assert "incomplete chunked read" in str(raised.value)


FAULT_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 429: "requests", 500: "server_error",
               503: "server_error"}
