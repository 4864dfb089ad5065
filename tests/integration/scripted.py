"""A tiny client for the scripted model's control API (stack/scripted_model.py).

    model = ScriptedModel(port)
    model.reset()                          # back to the start-up rules, request log cleared
    model.add_rules({"name": ..., "when": {...}, "then": {...}})   # prepended: newest wins
    model.requests(limit=5)                # what Letta sent (messages, tools offered, rule matched)
    model.reply_with_tools("greet", "Hi {who}!", ("remember_viewer_fact", {"fact": "name is {who}"}),
                           when={"user_regex": "I am (?P<who>\\w+)"}, times=1)
    model.fail("down", 503)                # the next chat request gets HTTP 503 (times=1)
    model.fail("out", 500, times=None, for_ms=60_000)   # every chat request, for the next 60 s
    model.cut_stream("cut", 3, {"reply": "never finished"})   # 3 SSE chunks, then the socket closes
    model.stats()["chat_requests"]         # model calls since the last reset; model.chat_requests("greet")

The rule builders (tool_calls_rule, fail_rule) only build dicts, for add_rules/set_rules.
Standard library only; every call raises on a non-2xx answer so a bad rule fails the test at once.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping


class ScriptedModelError(RuntimeError):
    pass


class ScriptedModel:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.base = f"http://{host}:{port}"
        self.timeout = timeout

    def _call(self, method: str, path: str, body: object | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else b""
        request = urllib.request.Request(self.base + path, data=data if method != "GET" else None, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise ScriptedModelError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None

    def reset(self) -> None:
        """Start-up rules again (none for the test stack) and an empty request log."""
        self._call("POST", "/_script/reset", {})

    def add_rules(self, *rules: dict) -> int:
        """Prepend rules (the first given ends up first, so it wins over the later ones)."""
        return self._call("POST", "/_script/rules", list(rules))["count"]

    def set_rules(self, *rules: dict) -> int:
        """Replace every rule."""
        return self._call("PUT", "/_script/rules", list(rules))["count"]

    def rules(self) -> dict:
        return self._call("GET", "/_script/rules")

    def requests(self, limit: int = 0) -> list[dict]:
        """The newest `limit` chat requests (0: all kept), oldest first."""
        return self._call("GET", f"/_script/requests?limit={int(limit)}")["requests"]

    def used(self, name: str) -> int:
        """How often the rule called `name` matched so far."""
        state = self.rules()
        return sum(used for rule, used in zip(state["rules"], state["used"]) if rule.get("name") == name)

    def stats(self) -> dict:
        """{"chat_requests", "streamed", "by_rule": {name: n}, "by_fault": {"fail_503"|"stall_ms"|...: n}}
        since the last reset; unlike the request log, not capped at 500 entries."""
        return self._call("GET", "/_script/stats")

    def chat_requests(self, rule: str | None = None) -> int:
        """Model calls since the last reset: all of them, or those answered by `rule` ("(default)" included)."""
        stats = self.stats()
        return stats["chat_requests"] if rule is None else stats["by_rule"].get(rule, 0)

    def reply_with_tools(self, name: str, reply: str | None, *calls: tuple[str, dict] | Mapping,
                         when: dict | None = None, times: int | None = None, text_position: str = "before",
                         **then: object) -> int:
        """Prepend a rule answering text and tool calls in one response (see tool_calls_rule)."""
        return self.add_rules(tool_calls_rule(name, reply, *calls, when=when, times=times,
                                              text_position=text_position, **then))

    def fail(self, name: str, status: int, message: str | None = None, *, when: dict | None = None,
             times: int | None = 1, stall_ms: int | None = None, for_ms: int | None = None,
             **error: str | None) -> int:
        """Prepend a rule answering HTTP `status` with an OpenAI-style error (see fail_rule); once by
        default, or (times=None, for_ms=N) every time for N ms from now."""
        rule = fail_rule(name, status, message, when=when, times=times, stall_ms=stall_ms, **error)
        if for_ms is not None:
            rule["for_ms"] = for_ms
        return self.add_rules(rule)

    def cut_stream(self, name: str, after_chunks: int, then: dict, *, when: dict | None = None,
                   times: int | None = 1) -> int:
        """Prepend a rule answering `then` but hanging up after `after_chunks` SSE chunks (plain requests:
        with no answer at all); once by default."""
        return self.add_rules(_rule(name, dict(then, cut_after_chunks=after_chunks), when, times))


def _rule(name: str, then: dict, when: dict | None, times: int | None) -> dict:
    rule = {"name": name, "when": dict(when or {}), "then": then}
    if times is not None:
        rule["times"] = times
    return rule


def tool_calls_rule(name: str, reply: str | None, *calls: tuple[str, dict] | Mapping, when: dict | None = None,
                    times: int | None = None, text_position: str = "before", **then: object) -> dict:
    """A rule whose answer is `reply` (None: no text) plus one call per `calls` item, each
    (tool_name, arguments) or {"name": ..., "arguments": {...}}; extra `then` keys
    (tokens_per_second, stall_ms, cut_after_chunks, ...) pass through."""
    if not calls:
        raise ValueError("tool_calls_rule needs at least one call")
    listed = [dict(call) if isinstance(call, Mapping) else {"name": call[0], "arguments": dict(call[1])}
              for call in calls]
    body: dict = {"tool_calls": listed, **then}
    if reply is not None:
        body["reply"] = reply
    if text_position != "before":  # without a reply the server refuses it, with a clear message
        body["text_position"] = text_position
    return _rule(name, body, when, times)


def fail_rule(name: str, status: int, message: str | None = None, *, when: dict | None = None,
              times: int | None = 1, stall_ms: int | None = None, **error: str | None) -> dict:
    """A rule answering HTTP `status`; `error` may set the body's "type" and "code"."""
    fail: dict = {"status": status, **error}
    if message is not None:
        fail["message"] = message
    body: dict = {"fail": fail}
    if stall_ms is not None:
        body["stall_ms"] = stall_ms
    return _rule(name, body, when, times)


def request_text(entry: dict) -> str:
    """Everything a logged request showed the model (all messages, tool calls included), as one string."""
    return json.dumps(entry["messages"], ensure_ascii=False)
