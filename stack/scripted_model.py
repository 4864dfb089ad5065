"""A deterministic, scriptable OpenAI-compatible model server.

A stand-in for the upstream language model ONLY: tests and the local demo point the Letta
server at it (OPENAI_BASE_URL=http://HOST:PORT/v1) because no real model is reachable here.
Standard library only (and vtuber_letta.model_names, which is too), so any interpreter can run it:

    python -m stack.scripted_model --host 127.0.0.1 --port 8399 [--rules rules.json]

Endpoints: GET /v1/models, POST /v1/chat/completions (plain and SSE), POST /v1/embeddings,
GET /health, and a JSON control API under /_script/: rules (GET, PUT replaces, POST prepends),
reset, requests (the request log, ?limit=N) and stats (request counts since the last reset).

Rules are evaluated in list order and the first match wins; POST /_script/rules PREPENDS,
so the newest rule wins. A rule (exact shape, all `when` keys optional):

    {"name": "greet", "times": 1, "for_ms": 60000,
     "when": {"user_contains": "hi", "user_regex": "my name is (?P<who>\\\\w+)",
              "system_contains": "VTuber", "turn_contains": "[note]", "after_tool": "save_fact" | "*",
              "tools_offered": "save_fact"},
     "then": {"reply": "Hello {who}! You said {user}"}
          or {"call_tool": "save_fact", "arguments": {"fact": "{who}"}}
          or {"reply_from_block": "human", "line_regex": "likes (?P<thing>.+)",
              "template": "You like {thing} ({line}; whole block: {block})"}
          or {"tool_calls": [{"name": "save_fact", "arguments": {"fact": "{who}"}},
                             {"name": "set_expression", "arguments": {"expression": "happy"}}]}
          or {"reply": "Nice to meet you, {who}!", "tool_calls": [...], "text_position": "after"}
          or {"reply_from_block": "human", ..., "tool_calls": [...]}
          or {"fail": {"status": 429, "message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}},
          plus optionally "tokens_per_second": 50.0, "delay_ms": 100 (or its alias "stall_ms": 100),
          "cut_after_chunks": 3 (not with fail, which takes only delay_ms/stall_ms)}

Actions. Exactly one of reply, call_tool, reply_from_block, tool_calls, fail; tool_calls may
also go with reply or reply_from_block: one response with text AND tool calls, as real models
send. `call_tool` is the original one-call form and keeps its exact shape (arguments streamed in
16-character fragments, never paced). `tool_calls` is one or more calls (arguments rendered like
call_tool's), ids unique per response, finish_reason "tool_calls"; streamed, each call's first
delta carries index/id/type/function.name and its arguments follow in token-sized pieces, calls
one after another by index. "text_position": "before" (default) streams the text before the
tool-call deltas, "after" streams the tool-call deltas first (some providers do). A call to a
tool the request did not offer turns the whole answer into the text
"(scripted model) tool NAME not offered". The rule decides how many calls come back:
`parallel_tool_calls` in the request is only logged, as many providers ignore it.

Pacing. tokens_per_second paces text tokens and tool_calls argument pieces (streamed: one wait
before each; plain: one wait for them all). delay_ms waits before anything of the response is
sent, headers included; stall_ms is the same thing under the name fault tests use (an alias:
give one of them), both happen after the request is logged, so a test can see a stalled request.

Faults. "fail": {"status": S} answers HTTP S, streamed or not, with an OpenAI-style JSON error
body {"error": {"message", "type", "param", "code"}}; message/type/code default per status
(FAULT_STATUSES; 401 is invalid_request_error/invalid_api_key, 429 adds "Retry-After: 1") and
may be overridden (e.g. "code": "context_length_exceeded"); the message is a template.
"cut_after_chunks": N on a streamed request sends at most N SSE chunks (never the finish chunk,
the usage chunk or [DONE]) and hangs up mid-body; on a plain request it hangs up without an
answer. "times" limits faults like any other rule; "for_ms" ends a rule that long after it was
set (an endpoint down for a while, whatever the clients retry). Clients retry some faults by themselves (the
openai SDK retries 408/409/429/5xx and broken connections twice by default), so count requests
in the log or /_script/stats, not turns.

`system_contains` looks at every system message of the request (the system prompt and any note
in the history); `turn_contains` only at what is new in it: the messages after the last assistant
message, whatever their role (e.g. a system note sent with this turn's user message).

A rule without `after_tool` never matches right after a tool result, so a scripted tool call
cannot loop. Templates replace {user}, {name}, {tool_result}, named regex groups and, for
reply_from_block (its template and the arguments of tool_calls going with it), {block}, {line}
and line_regex groups; unknown fields render empty, {{ and }} are literal braces.

Every chat request is logged (GET /_script/requests): seq, time, model, stream, messages,
message_count, tools (names offered), tool_choice, parallel_tool_calls_sent and
parallel_tool_calls (its value, None when not sent), rule (name, "(default)" when none
matched), fault (the rule's fail/stall_ms/cut_after_chunks, None without) and response (what was
planned: {"reply"}, {"tool_call", "id", "arguments"} for call_tool, {"reply", "tool_calls":
[{"name", "id", "arguments"}]} for tool_calls, {"fail": {...}}). GET /_script/stats counts
without the log's 500-entry limit: {"chat_requests", "streamed", "by_rule", "by_fault"}.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import json
import math
import re
import socket
import struct
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from vtuber_letta.model_names import EMBEDDING_MODEL_ID, SCRIPTED_MODEL_ID

OWNER = "vtuber-letta-scripted"
REQUEST_LOG_SIZE = 500
DEFAULT_EMBEDDING_DIM = 1536
MAX_BODY_BYTES = 32 * 1024 * 1024

WHEN_KEYS = {"user_contains", "user_regex", "system_contains", "turn_contains", "after_tool", "tools_offered"}
# What a rule answers with -> the keys that only make sense together with it.
ACTION_KEYS = {"reply": (), "call_tool": ("arguments",), "reply_from_block": ("line_regex", "template"),
               "tool_calls": ("text_position",), "fail": ()}
# The only actions that go together: text plus tool calls in one response, as real models answer.
ACTION_PAIRS = ({"reply", "tool_calls"}, {"reply_from_block", "tool_calls"})
PACING_KEYS = ("tokens_per_second", "delay_ms", "stall_ms", "cut_after_chunks")
FAIL_PACING_KEYS = ("delay_ms", "stall_ms")  # an error can be slow to come, but has no tokens or chunks to cut
# HTTP status -> (error type, error code, message) as OpenAI answers them; a fail rule may override each.
FAULT_STATUSES = {
    400: ("invalid_request_error", None, "Invalid request (scripted fault)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (scripted fault)."),
    402: ("insufficient_quota", "insufficient_quota", "You exceeded your current quota (scripted fault)."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Permission denied (scripted fault)."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist (scripted fault)."),
    413: ("invalid_request_error", None, "Request too large (scripted fault)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (scripted fault). Please try again in 1s."),
    500: ("server_error", None, "The server had an error while processing your request (scripted fault)."),
    502: ("server_error", None, "Bad gateway (scripted fault)."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later (scripted fault)."),
}


class RuleError(ValueError):
    """A rule that cannot be used; the message names the rule index and field."""


# ---------------------------------------------------------------- rule validation

def _is_text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


# Field path -> (test, what the value must be); every `when` condition is a non-empty string.
FIELD_CHECKS = {f"when.{key}": (_is_text, "a non-empty string") for key in WHEN_KEYS} | {
    "name": (_is_text, "a non-empty string"),
    "times": (_is_count, "a non-negative integer"),
    "for_ms": (_is_count, "a non-negative integer (milliseconds after the rule was set)"),
    "then.reply": (lambda v: isinstance(v, str), "a string"),
    "then.call_tool": (_is_text, "a non-empty string"),
    "then.reply_from_block": (_is_text, "a non-empty string (a block label)"),
    "then.arguments": (lambda v: isinstance(v, dict), "an object"),
    "then.line_regex": (lambda v: isinstance(v, str), "a string"),
    "then.template": (lambda v: isinstance(v, str), "a string"),
    "then.tool_calls": (lambda v: isinstance(v, list) and v != [],
                        'a non-empty list of {"name": ..., "arguments": {...}} objects'),
    "then.text_position": (lambda v: v in ("before", "after"), '"before" or "after"'),
    "then.fail": (lambda v: isinstance(v, dict), 'an object like {"status": 500, "message": "..."}'),
    "then.tokens_per_second": (lambda v: type(v) in (int, float) and v > 0, "a positive number"),
    "then.delay_ms": (_is_count, "a non-negative integer"),
    "then.stall_ms": (_is_count, "a non-negative integer"),
    "then.cut_after_chunks": (_is_count, "a non-negative integer"),
}
REGEX_FIELDS = ("when.user_regex", "then.line_regex")
# The objects inside then.tool_calls[i] and then.fail: key -> (test, what), and the keys they need.
TOOL_CALL_CHECKS = {"name": (_is_text, "a non-empty string (a tool name)"),
                    "arguments": (lambda v: isinstance(v, dict), "an object")}
FAIL_CHECKS = {"status": (lambda v: type(v) is int and v in FAULT_STATUSES, f"one of {sorted(FAULT_STATUSES)}"),
               "message": (lambda v: isinstance(v, str), "a string"),
               "type": (_is_text, "a non-empty string"),
               "code": (lambda v: v is None or _is_text(v), "a non-empty string or null")}


def validate_rules(rules: object) -> list[dict]:
    """Checks a list of rules (or {"rules": [...]}) and returns a private deep copy."""
    if isinstance(rules, dict) and "rules" in rules:
        rules = rules["rules"]
    if not isinstance(rules, list):
        raise RuleError("rules must be a JSON list of rule objects")
    for index, rule in enumerate(rules):
        _validate_rule(rule, f"rule[{index}]")
    return json.loads(json.dumps(rules))


def _validate_rule(rule: object, where: str) -> None:
    def fail(path: str, why: str):
        raise RuleError(f"{where}.{path}: {why}" if path else f"{where}: {why}")

    def check_object(value: dict, path: str, checks: dict, required: tuple) -> None:
        for key in required:
            if key not in value:
                fail(f"{path}.{key}", "is required")
        for key, item in value.items():
            if key not in checks:
                fail(f"{path}.{key}", f"unknown key (allowed: {', '.join(checks)})")
            test, what = checks[key]
            if not test(item):
                fail(f"{path}.{key}", f"must be {what}")

    if not isinstance(rule, dict):
        fail("", "must be an object")
    if not isinstance(rule.get("when", {}), dict):
        fail("when", "must be an object")
    if not isinstance(rule.get("then"), dict):
        fail("then", "must be an object")
    then = rule["then"]
    actions = [key for key in ACTION_KEYS if key in then]
    if len(actions) != 1 and set(actions) not in ACTION_PAIRS:
        fail("then", f"needs exactly one of {sorted(ACTION_KEYS)} (tool_calls may also go with reply or reply_from_block)")
    label = "+".join(actions)
    allowed = {"name", "times", "for_ms"} | {f"when.{key}" for key in WHEN_KEYS}
    pacing = FAIL_PACING_KEYS if "fail" in actions else PACING_KEYS
    allowed |= {f"then.{key}" for action in actions for key in (action, *ACTION_KEYS[action])}
    allowed |= {f"then.{key}" for key in pacing}
    fields = {key: value for key, value in rule.items() if key not in ("when", "then")}
    fields.update({f"when.{key}": value for key, value in rule.get("when", {}).items()})
    fields.update({f"then.{key}": value for key, value in then.items()})
    fields.setdefault("name", None)
    for path, value in fields.items():
        if path not in allowed:
            fail(path, "unknown key" if path not in FIELD_CHECKS else f"not used with {label}")
        test, what = FIELD_CHECKS[path]
        if not test(value):
            fail(path, f"must be {what}")
        if path in REGEX_FIELDS:
            try:
                re.compile(value)
            except re.error as exc:
                fail(path, f"invalid regex: {exc}")
    if "text_position" in then and actions == ["tool_calls"]:
        fail("then.text_position", "only used when tool_calls goes with reply or reply_from_block")
    if "delay_ms" in then and "stall_ms" in then:
        fail("then.stall_ms", "is an alias of delay_ms: give one of them")
    for index, call in enumerate(then.get("tool_calls", [])):
        if not isinstance(call, dict):
            fail(f"then.tool_calls[{index}]", 'must be an object like {"name": "save_fact", "arguments": {...}}')
        check_object(call, f"then.tool_calls[{index}]", TOOL_CALL_CHECKS, ("name",))
    if "fail" in then:
        check_object(then["fail"], "then.fail", FAIL_CHECKS, ("status",))


# ---------------------------------------------------------------- reading a request

@dataclass
class Conversation:
    """What rules can look at, extracted once from the chat request."""

    messages: list
    system: str = ""
    turn: str = ""  # every message after the last assistant message: what this request adds
    user: str = ""
    name: str = ""
    after_tool: str | None = None  # tool name when the last message is a tool result, else None
    tool_result: str = ""
    tools: list[str] = field(default_factory=list)


def content_text(content: object) -> str:
    # Letta sends a plain string, but OpenAI-style content parts are accepted too.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n\n".join(parts)
    return ""


def _unwrap_packaged(text: str) -> tuple[str | None, str]:
    """Older Letta agents send user turns as JSON ({"type": "user_message", "message": ...}).

    Returns (text, name); text is None for packaged non-user turns (heartbeats, alerts)."""
    if not text.lstrip().startswith("{"):
        return text, ""
    try:
        packet = json.loads(text)
    except ValueError:
        return text, ""
    if not isinstance(packet, dict) or "type" not in packet:
        return text, ""
    if packet["type"] == "user_message" and isinstance(packet.get("message"), str):
        return packet["message"], str(packet.get("name") or "")
    return None, ""


def read_conversation(body: dict) -> Conversation:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a non-empty list of objects")
    offered = [t.get("function") for t in body.get("tools") or [] if isinstance(t, dict)]
    convo = Conversation(messages, tools=[f["name"] for f in offered if isinstance(f, dict) and _is_text(f.get("name"))])
    # "developer" is what Letta sends instead of "system" for some OpenAI model families.
    convo.system = "\n\n".join(content_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    # The system prompt leads every request: never "new" (Letta puts the memory blocks there).
    first = 1 if messages[0].get("role") in ("system", "developer") else 0
    start = max((i + 1 for i, m in enumerate(messages) if m.get("role") == "assistant"), default=first)
    convo.turn = "\n\n".join(content_text(m.get("content")) for m in messages[start:])
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        text, packed_name = _unwrap_packaged(content_text(message.get("content")))
        if text is not None:
            convo.user, convo.name = text, str(message.get("name") or packed_name)
            break
    # A system note after the tool results (the bridge asks for the next step that way) still
    # leaves the model answering those results.
    end = len(messages)
    while end > 1 and messages[end - 1].get("role") in ("system", "developer"):
        end -= 1
    last = messages[end - 1]
    if last.get("role") in ("tool", "function"):
        convo.tool_result = content_text(last.get("content"))
        convo.after_tool = _tool_name_for(last, messages) or ""
    return convo


def _tool_name_for(result: dict, messages: list) -> str | None:
    call_id = result.get("tool_call_id")
    for message in reversed(messages):
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, dict) and call.get("id") == call_id and isinstance(call.get("function"), dict):
                return call["function"].get("name")
    return result.get("name")


# ---------------------------------------------------------------- matching and answering

@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""  # given when the response is built, so ids follow the order responses go out


@dataclass
class Answer:
    rule: str  # matched rule name, "(default)" when none matched
    text: str | None = None
    calls: list[ToolCall] = field(default_factory=list)
    text_after_calls: bool = False  # "text_position": "after": stream the tool-call deltas first
    # The call_tool form: its stream keeps the shape it always had (16-character argument
    # fragments, unpaced), so everything scripted before this form existed sees the same bytes.
    call_tool_form: bool = False
    tokens_per_second: float | None = None
    delay_ms: int = 0
    fail: dict | None = None  # {"status", "message", "type", "code"} of a scripted HTTP error
    cut_after_chunks: int | None = None
    fault: dict | None = None  # the rule's fault keys, for the request log


def rule_variables(rule: dict, convo: Conversation) -> dict | None:
    """Template variables if every condition of the rule holds, else None."""
    when = rule.get("when", {})
    if ("after_tool" in when) != (convo.after_tool is not None):
        return None
    if when.get("after_tool", "*") not in ("*", convo.after_tool):
        return None
    if when.get("user_contains", "").lower() not in convo.user.lower():
        return None
    if when.get("system_contains", "") not in convo.system:
        return None
    if when.get("turn_contains", "") not in convo.turn:
        return None
    if "tools_offered" in when and when["tools_offered"] not in convo.tools:
        return None
    variables = {"user": convo.user, "name": convo.name, "tool_result": convo.tool_result}
    if "user_regex" in when:
        match = re.search(when["user_regex"], convo.user, re.IGNORECASE)
        if not match:
            return None
        variables.update({k: v or "" for k, v in match.groupdict().items()})
    return variables


_TEMPLATE_FIELD = re.compile(r"\{\{|\}\}|\{(\w*)\}")


def render(template: str, variables: dict) -> str:
    """str.format-like, but never raises: unknown fields render empty, no attribute access."""
    def field_value(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        return str(variables.get(match.group(1)) or "")
    return _TEMPLATE_FIELD.sub(field_value, template)


def _render_arguments(value: object, variables: dict) -> object:
    if isinstance(value, str):
        return render(value, variables)
    if isinstance(value, dict):
        return {k: _render_arguments(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_arguments(v, variables) for v in value]
    return value


def find_block(system: str, label: str) -> str | None:
    """The value of memory block `label` as Letta 0.16.8 renders it (letta/schemas/memory.py,
    Memory._render_memory_blocks_standard / _line_numbered):
    <label>\\n<description>\\n...\\n</description>\\n<metadata>...</metadata>\\n
    [<warning>...</warning>\\n]<value>\\nVALUE\\n</value>\\n</label>. Falls back to <label>...</label>."""
    tag = re.escape(label)
    standard = re.search(
        rf"<{tag}>\s*<description>.*?</description>\s*<metadata>.*?</metadata>\s*"
        rf"(<warning>.*?</warning>\s*)?<value>\n?(.*?)\n?</value>\s*</{tag}>", system, re.DOTALL)
    if standard:
        value = standard.group(2)
        # Line-numbered rendering (Anthropic models) prefixes each line with "N→ ".
        return re.sub(r"(?m)^\d+→ ", "", value) if standard.group(1) else value
    plain = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", system, re.DOTALL)
    return plain.group(1) if plain else None


def _answer_from_block(then: dict, convo: Conversation, variables: dict) -> tuple[str, dict]:
    """The reply text, and the variables extended by {block}, {line} and line_regex groups
    (tool_calls going with reply_from_block render their arguments with them)."""
    label = then["reply_from_block"]
    block = find_block(convo.system, label)
    if block is None:
        return f"(scripted model) no block {label} in my prompt", variables
    variables = dict(variables, block=block, line="")
    if "line_regex" in then:
        for line in block.splitlines():
            match = re.search(then["line_regex"], line, re.IGNORECASE)
            if match:
                variables.update({k: v or "" for k, v in match.groupdict().items()}, line=line)
                break
        else:
            return f"(scripted model) no line matching {then['line_regex']} in block {label}", variables
    return render(then.get("template") or ("{line}" if "line_regex" in then else "{block}"), variables), variables


def plan_answer(rule: dict | None, variables: dict | None, convo: Conversation) -> Answer:
    if rule is None:
        text = "(scripted) ok" if convo.after_tool is not None else f"(scripted) I heard: {convo.user}"
        return Answer(rule="(default)", text=text)
    then = rule["then"]
    fault = {key: then[key] for key in ("fail", "stall_ms", "cut_after_chunks") if key in then}
    answer = Answer(rule=rule["name"], tokens_per_second=then.get("tokens_per_second"),
                    delay_ms=then.get("delay_ms", then.get("stall_ms", 0)),
                    cut_after_chunks=then.get("cut_after_chunks"), fault=fault or None)
    if "fail" in then:
        answer.fail = fault_error(then["fail"], variables)
        return answer
    if "reply" in then:
        answer.text = render(then["reply"], variables)
    elif "reply_from_block" in then:
        answer.text, variables = _answer_from_block(then, convo, variables)
    if "call_tool" in then:
        if then["call_tool"] not in convo.tools:
            answer.text = f"(scripted model) tool {then['call_tool']} not offered"
        else:
            answer.calls = [ToolCall(then["call_tool"], _render_arguments(then.get("arguments", {}), variables))]
            answer.call_tool_form = True
    elif "tool_calls" in then:
        missing = list(dict.fromkeys(c["name"] for c in then["tool_calls"] if c["name"] not in convo.tools))
        if missing:
            answer.text = f"(scripted model) tool {', '.join(missing)} not offered"
        else:
            answer.calls = [ToolCall(c["name"], _render_arguments(c.get("arguments", {}), variables))
                            for c in then["tool_calls"]]
            answer.text_after_calls = then.get("text_position") == "after"
    return answer


def fault_error(fail: dict, variables: dict) -> dict:
    kind, code, message = FAULT_STATUSES[fail["status"]]
    return {"status": fail["status"], "message": render(fail.get("message", message), variables),
            "type": fail.get("type", kind), "code": fail.get("code", code)}


# ---------------------------------------------------------------- shared state

class ScriptState:
    """Rules, their use counts and the request log; every access holds the lock."""

    def __init__(self, rules: list[dict]):
        self._lock = threading.Lock()
        self._initial = validate_rules(rules)
        self._rules: list[list] = []  # [rule, times_used, monotonic time it was set]
        self._log: collections.deque = collections.deque(maxlen=REQUEST_LOG_SIZE)
        self._counters = {"request": 0, "call": 0}
        self._stats: dict = {}
        # Letta 0.16.8 drops a tool result whose tool_call_id already occurs in the agent's context
        # (Message.dedupe_tool_messages_for_llm_api), so ids must not repeat across server restarts.
        self.call_prefix = f"call_{hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:8]}_"
        self.reset()

    def reset(self) -> None:
        # Tool-call ids keep counting for the same reason as call_prefix.
        with self._lock:
            now = time.monotonic()
            self._rules = [[rule, 0, now] for rule in json.loads(json.dumps(self._initial))]
            self._log.clear()
            self._stats = {"chat_requests": 0, "streamed": 0, "by_rule": collections.Counter(),
                           "by_fault": collections.Counter()}

    def rules(self) -> dict:
        with self._lock:
            return {"rules": [rule for rule, _, _ in self._rules], "used": [used for _, used, _ in self._rules]}

    def replace(self, rules: object) -> int:
        checked = validate_rules(rules)
        with self._lock:
            self._rules = [[rule, 0, time.monotonic()] for rule in checked]
            return len(self._rules)

    def prepend(self, rules: object) -> int:
        checked = validate_rules([rules] if isinstance(rules, dict) and "name" in rules else rules)
        with self._lock:
            self._rules[:0] = [[rule, 0, time.monotonic()] for rule in checked]
            return len(self._rules)

    def choose(self, convo: Conversation) -> Answer:
        with self._lock:
            now = time.monotonic()
            for entry in self._rules:
                rule, used, set_at = entry
                if rule.get("times") is not None and used >= rule["times"]:
                    continue
                if rule.get("for_ms") is not None and (now - set_at) * 1000 >= rule["for_ms"]:
                    continue
                variables = rule_variables(rule, convo)
                if variables is not None:
                    entry[1] += 1
                    return plan_answer(rule, variables, convo)
        return plan_answer(None, None, convo)

    def next_id(self, kind: str) -> int:
        with self._lock:
            self._counters[kind] += 1
            return self._counters[kind]

    def record(self, entry: dict) -> None:
        with self._lock:
            self._log.append(entry)
            self._stats["chat_requests"] += 1
            self._stats["streamed"] += bool(entry["stream"])
            self._stats["by_rule"][entry["rule"]] += 1
            for kind, value in (entry["fault"] or {}).items():
                self._stats["by_fault"][f"fail_{value['status']}" if kind == "fail" else kind] += 1

    def stats(self) -> dict:
        """Counts since the last reset, kept apart from the log so its size limit does not cap them."""
        with self._lock:
            return {key: dict(value) if isinstance(value, collections.Counter) else value
                    for key, value in self._stats.items()}

    def requests(self, limit: int | None) -> list[dict]:
        with self._lock:
            entries = list(self._log)
        return entries[-limit:] if limit else entries


# ---------------------------------------------------------------- response bodies

def _tokens(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)  # joins back to exactly `text`


# Token-sized pieces of a JSON string, roughly as a tokenizer cuts it: a word (at most 8
# characters) or a run of up to 3 punctuation characters, each with the spaces before it.
# Pieces may split an escape such as \u00e9; clients join the pieces before parsing.
_ARGUMENT_PIECE = re.compile(r"\s*(?:\w{1,8}|[^\w\s]{1,3})|\s+")


def argument_pieces(arguments: str) -> list[str]:
    return _ARGUMENT_PIECE.findall(arguments)  # joins back to exactly `arguments`


def _pieces_for(answer: Answer, arguments: str) -> list[str]:
    if answer.call_tool_form:
        return [arguments[start:start + 16] for start in range(0, len(arguments), 16)]
    return argument_pieces(arguments)


def paced_units(answer: Answer) -> int:
    """How many waits of 1/tokens_per_second the answer takes: text tokens and argument pieces."""
    units = len(_tokens(answer.text or ""))
    if not answer.call_tool_form:
        units += sum(len(argument_pieces(json.dumps(call.arguments))) for call in answer.calls)
    return units


def usage_for(convo: Conversation, answer: Answer) -> dict:
    prompt = max(1, len(json.dumps(convo.messages)) // 4)
    output = (answer.text or "") + "".join(json.dumps(call.arguments) + call.name for call in answer.calls)
    completion = max(1, len(output) // 4)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(answer: Answer, model: str, convo: Conversation, seq: int) -> dict:
    message: dict = {"role": "assistant", "content": answer.text, "refusal": None}
    if answer.calls:
        message["tool_calls"] = [{"id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
                                 for call in answer.calls]
    finish = "tool_calls" if answer.calls else "stop"
    return {"id": f"chatcmpl-scripted-{seq}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage_for(convo, answer)}


def stream_chunks(answer: Answer, model: str, convo: Conversation, seq: int, include_usage: bool):
    """Yields (seconds_to_wait_first, chunk) in the OpenAI chat.completion.chunk shape."""
    base = {"id": f"chatcmpl-scripted-{seq}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    pace = 1.0 / answer.tokens_per_second if answer.tokens_per_second else 0.0

    def text_chunks():
        for token in _tokens(answer.text or ""):
            yield pace, chunk({"content": token})

    def call_chunks():
        piece_pace = 0.0 if answer.call_tool_form else pace
        for index, call in enumerate(answer.calls):
            yield 0.0, chunk({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                              "function": {"name": call.name, "arguments": ""}}]})
            for piece in _pieces_for(answer, json.dumps(call.arguments)):  # several fragments, as real servers send
                yield piece_pace, chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})

    yield 0.0, chunk({"role": "assistant", "content": "" if answer.text is not None else None})
    parts = (call_chunks, text_chunks) if answer.text_after_calls else (text_chunks, call_chunks)
    for part in parts:
        yield from part()
    yield 0.0, chunk({}, "tool_calls" if answer.calls else "stop")
    if include_usage:
        yield 0.0, dict(base, choices=[], usage=usage_for(convo, answer))


def is_closing_chunk(chunk: dict) -> bool:
    """The finish chunk or the usage chunk: what a cut stream must never reach."""
    return not chunk["choices"] or chunk["choices"][0]["finish_reason"] is not None


def response_summary(answer: Answer) -> dict:
    """What the request log says was answered."""
    if answer.fail is not None:
        return {"fail": answer.fail}
    if answer.call_tool_form:
        (call,) = answer.calls
        return {"tool_call": call.name, "id": call.id, "arguments": call.arguments}
    if not answer.calls:
        return {"reply": answer.text}
    return {"reply": answer.text,
            "tool_calls": [{"name": call.name, "id": call.id, "arguments": call.arguments} for call in answer.calls]}


EMBEDDING_WORD = re.compile(r"[^\W_]+")
CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def embedding_tokens(text: str) -> list[str]:
    """The words of text, case-folded; runs of CJK characters count character by character (no spaces there)."""
    tokens = []
    for word in EMBEDDING_WORD.findall(unicodedata.normalize("NFKC", text).casefold()):
        tokens.extend(CJK_CHAR.findall(word) if CJK_CHAR.search(word) else [word])
    return tokens


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on (text, dimensions): a hashed bag of words.

    Texts that share words point the same way, so a vector search over archival passages
    (issue 19's per-viewer tier) finds a fact by its words, deterministically. Each word adds
    +-1 at two hashed positions; text without words falls back to a hash of the whole text.
    """
    values = [0.0] * dimensions
    for token in embedding_tokens(text):
        digest = hashlib.blake2b(token.encode("utf-8"), digest_size=16).digest()
        for offset in (0, 8):
            position = int.from_bytes(digest[offset:offset + 4], "little") % dimensions
            values[position] += 1.0 if digest[offset + 4] & 1 else -1.0
    if not any(values):
        raw = hashlib.shake_256(text.encode("utf-8")).digest(2 * dimensions)
        values = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dimensions}H", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embeddings_body(body: dict) -> dict:
    inputs = body.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(i, int) for i in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise ValueError("'input' must be a string or a non-empty list")
    dimensions = DEFAULT_EMBEDDING_DIM if body.get("dimensions") is None else body["dimensions"]
    if type(dimensions) is not int or not 1 <= dimensions <= 8192:
        raise ValueError("'dimensions' must be an integer between 1 and 8192")
    data = []
    for index, item in enumerate(inputs):
        vector = embedding_vector(item if isinstance(item, str) else json.dumps(item), dimensions)
        # The openai SDK asks for base64 (little-endian float32) unless told otherwise.
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(max(1, len(str(i)) // 4) for i in inputs)
    return {"object": "list", "data": data, "model": body.get("model") or EMBEDDING_MODEL_ID,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def models_body() -> dict:
    return {"object": "list", "data": [
        {"id": SCRIPTED_MODEL_ID, "object": "model", "created": 0, "owned_by": OWNER},
        {"id": EMBEDDING_MODEL_ID, "object": "model", "created": 0, "owned_by": OWNER}]}


# ---------------------------------------------------------------- HTTP

class BadRequest(Exception):
    pass


class ScriptedModelHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every plain response carries Content-Length
    timeout = 300  # idle keep-alive connections give their thread back eventually
    server_version = "scripted-model/1"
    # As real model servers do (uvicorn and its kin set TCP_NODELAY): every write goes out at once,
    # so a stream's events are not held back by Nagle waiting for the client's delayed ACK.
    disable_nagle_algorithm = True
    model = rule = "-"
    streaming = False

    def log_message(self, format, *args):  # noqa: A002 - quiet: send_response logs one line per request
        pass

    def send_response(self, code, message=None):
        # Logged before the first byte goes out, so the line precedes anything the client does next.
        sys.stderr.write(f"scripted-model {self.command} {urlsplit(self.path).path} "
                         f"model={self.model} rule={self.rule} status={code}\n")
        super().send_response(code, message)

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_GET

    def _handle(self) -> None:
        self.model, self.rule, self.streaming = "-", "-", False
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        path = path[3:] if path.startswith("/v1/") else path  # accept base URLs with or without /v1
        try:
            self._route(self.command, path, parse_qs(url.query))
        except BadRequest as exc:
            self._send_error(400, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-answer
        except Exception as exc:  # a bug here must answer 500, not vanish
            sys.stderr.write(f"scripted-model error: {type(exc).__name__}: {exc}\n")
            if self.streaming:  # headers are gone already: the only honest signal is to hang up
                self.close_connection = True
            else:
                self._send_error(500, f"{type(exc).__name__}: {exc}", "server_error")

    def _route(self, method: str, path: str, query: dict) -> None:
        state: ScriptState = self.server.script
        route = (method, path)
        if route == ("GET", "/health"):
            self._send_json({"status": "ok"})
        elif route == ("GET", "/models"):
            self._send_json(models_body())
        elif route == ("POST", "/chat/completions"):
            self._chat(state, self._read_json())
        elif route == ("POST", "/embeddings"):
            body = self._read_json()
            self.model = str(body.get("model", "-"))
            self._send_json(_checked(embeddings_body, body))
        elif route == ("GET", "/_script/rules"):
            self._send_json(state.rules())
        elif route in (("PUT", "/_script/rules"), ("POST", "/_script/rules")):
            change = state.replace if method == "PUT" else state.prepend
            self._send_json({"count": _checked(change, self._read_json(allow_list=True))})
        elif route == ("POST", "/_script/reset"):
            self._read_body()
            state.reset()
            self._send_json({"status": "reset"})
        elif route == ("GET", "/_script/requests"):
            limit = query.get("limit", ["0"])[0]
            if not limit.isdigit():
                raise BadRequest("limit must be a non-negative integer")
            self._send_json({"requests": state.requests(int(limit))})
        elif route == ("GET", "/_script/stats"):
            self._send_json(state.stats())
        else:
            self._read_body()
            self._send_error(404, f"no route for {method} {self.path}", code="not_found")

    def _chat(self, state: ScriptState, body: dict) -> None:
        self.model = str(body.get("model", "-"))
        convo = _checked(read_conversation, body)
        answer = state.choose(convo)
        self.rule = answer.rule
        seq = state.next_id("request")
        for call in answer.calls:
            call.id = f"{state.call_prefix}{state.next_id('call')}"
        streamed = bool(body.get("stream"))
        state.record({"seq": seq, "time": time.time(), "model": self.model, "stream": streamed,
                      "messages": convo.messages, "message_count": len(convo.messages), "tools": convo.tools,
                      "tool_choice": body.get("tool_choice"),
                      "parallel_tool_calls_sent": "parallel_tool_calls" in body,
                      "parallel_tool_calls": body.get("parallel_tool_calls"),
                      "rule": answer.rule, "fault": answer.fault, "response": response_summary(answer)})
        time.sleep(answer.delay_ms / 1000.0)
        if answer.fail is not None:
            self._send_fault(answer.fail)
            return
        if not streamed:
            if answer.cut_after_chunks is not None:
                self._hang_up("before the response")
                return
            if answer.tokens_per_second:
                time.sleep(paced_units(answer) / answer.tokens_per_second)
            self._send_json(completion_body(answer, self.model, convo, seq))
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self._start_stream()
        for sent, (wait, chunk) in enumerate(stream_chunks(answer, self.model, convo, seq, include_usage)):
            if answer.cut_after_chunks is not None and (sent >= answer.cut_after_chunks or is_closing_chunk(chunk)):
                self._hang_up(f"after {sent} chunks")
                return
            time.sleep(wait)
            self._write_chunk(f"data: {json.dumps(chunk)}\n\n".encode())
        self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _send_fault(self, fail: dict) -> None:
        # OpenAI sends the error as plain JSON even when a stream was asked for; the SDK raises on the status.
        headers = {"Retry-After": "1"} if fail["status"] == 429 else {}
        self._send_error(fail["status"], fail["message"], fail["type"], fail["code"], headers)

    def _hang_up(self, when: str) -> None:
        """Drops the connection with no more bytes: a stream without finish_reason or [DONE], or no answer."""
        sys.stderr.write(f"scripted-model {self.command} {urlsplit(self.path).path} "
                         f"model={self.model} rule={self.rule} hung up {when}\n")
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client is gone already: same outcome

    # -- bodies in and out

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        # Without a usable length we cannot tell where the next request starts: answer and hang up.
        if "Transfer-Encoding" in self.headers or not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest("send a JSON body with a valid Content-Length (at most 32 MiB)")
        return self.rfile.read(length)

    def _read_json(self, allow_list: bool = False) -> dict | list:
        try:
            body = json.loads(self._read_body() or b"null")
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict) and not (allow_list and isinstance(body, list)):
            raise BadRequest("request body must be a JSON object")
        return body

    def _send_json(self, payload: object, status: int = 200, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                    headers: dict | None = None):
        self._send_json({"error": {"message": message, "type": kind, "param": None, "code": code}}, status, headers)

    def _start_stream(self) -> None:
        # Chunked transfer keeps the connection reusable for httpx and flushes every event.
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def _checked(function, argument):
    """Runs a parser or validator; its ValueError (RuleError included) becomes an HTTP 400."""
    try:
        return function(argument)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


class ScriptedModelServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog of 5 drops bursts of parallel agent turns

    def __init__(self, address: tuple[str, int], rules: list):
        self.script = ScriptState(rules)  # validated before the port is taken
        super().__init__(address, ScriptedModelHandler)


def make_server(host: str, port: int, rules: list | None = None) -> ScriptedModelServer:
    return ScriptedModelServer((host, port), rules or [])


def serve(host: str = "127.0.0.1", port: int = 0, rules: list | None = None) -> ScriptedModelServer:
    """Start in a background thread (for in-process tests); stop with .shutdown(); .server_close()."""
    server = make_server(host, port, rules)
    threading.Thread(target=server.serve_forever, name="scripted-model", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.scripted_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8399)
    parser.add_argument("--rules", help="JSON file with a list of rules")
    args = parser.parse_args(argv)
    rules = []
    if args.rules:
        try:
            with open(args.rules, encoding="utf-8") as handle:
                rules = validate_rules(json.load(handle))
        except (OSError, ValueError) as exc:
            print(f"scripted-model: cannot load rules from {args.rules}: {exc}", file=sys.stderr)
            return 2
    try:
        server = make_server(args.host, args.port, rules)
    except OSError as exc:  # port taken, host not local: say so instead of a traceback
        print(f"scripted-model: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"scripted-model listening on http://{host}:{port}/v1 ({len(rules)} rules)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
