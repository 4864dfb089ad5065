"""The memory gate called from a trusted process that holds the gate secret (tests, benches, tools).

It sends exactly what a memory tool sends from Letta's sandbox (tools/memory_client.py), with the
agent's own token derived here, and answers like that tool: the gate's message, or "Error: ...".
Driving the gate this way stands in for the model turns that would each end in the same call.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tools.memory_gate import memory_token


class GateClient:
    def __init__(self, base_url: str, secret: str, timeout: float = 60.0):
        self.base = base_url.rstrip("/")
        self.secret = secret
        self.timeout = timeout
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, token inside

    @classmethod
    def from_settings(cls, settings) -> "GateClient":
        return cls(settings.memory_gate_url, settings.memory_gate_secret)

    def call(self, operation: str, agent_id: str, **fields: str) -> str:
        body = json.dumps({"agent_id": agent_id, "token": memory_token(self.secret, agent_id), **fields}).encode()
        request = urllib.request.Request(f"{self.base}/v1/{operation}", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            answer = json.loads(exc.read() or b"{}")
        return answer["message"] if "message" in answer else "Error: " + str(answer.get("error"))

    def remember(self, agent_id: str, fact: str, category: str) -> str:
        return self.call("remember", agent_id, fact=fact, category=category)

    def forget(self, agent_id: str, fact: str) -> str:
        return self.call("forget", agent_id, fact=fact)

    def recall(self, agent_id: str, query: str) -> str:
        return self.call("recall", agent_id, query=query)


def recalled_facts(answer: str) -> list[str]:
    """The fact texts of a recall answer (its "- (category) text (stored YYYY-MM-DD)" lines)."""
    facts = []
    for line in answer.splitlines():
        if line.startswith("- (") and ") " in line:
            facts.append(line.split(") ", 1)[1].rsplit(" (stored ", 1)[0])
    return facts
