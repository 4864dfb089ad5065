"""A tiny client for the scripted model's control API (stack/scripted_model.py).

    model = ScriptedModel(port)
    model.reset()                          # back to the start-up rules, request log cleared
    model.add_rules({"name": ..., "when": {...}, "then": {...}})   # prepended: newest wins
    model.requests(limit=5)                # what Letta sent (messages, tools offered, rule matched)

Standard library only; every call raises on a non-2xx answer so a bad rule fails the test at once.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request


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


def request_text(entry: dict) -> str:
    """Everything a logged request showed the model (all messages, tool calls included), as one string."""
    return json.dumps(entry["messages"], ensure_ascii=False)
